"""Load causal LMs and tokenizers through transformers, and build small ones (saving: :mod:`.saving`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distillery.config import ConfigError, ModelConfig
from distillery.errors import MissingExtraError, MissingInputError

# config dtype names -> torch dtypes (model.dtype "auto" keeps the checkpoint's own)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' → the first CUDA device if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory or hub id, with a pad token guaranteed."""
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # common for base LMs: pad with EOS; the loss masks padded positions anyway
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig | str, **overrides: Any) -> PreTrainedModel:
    """A causal LM from ``cfg.path`` (local directory or hub id) on ``cfg.device`` in ``cfg.dtype``."""
    if isinstance(cfg, str):
        cfg = ModelConfig(path=cfg, **overrides)
    if cfg.path is None:
        raise ConfigError("load_model needs model.path (a local HF directory or a hub id)")
    path = Path(cfg.path)
    if not path.exists() and (path.is_absolute() or cfg.path.startswith(".")):
        raise MissingInputError(f"model directory not found: {cfg.path}")
    if (path / "adapter_config.json").is_file() and importlib.util.find_spec("peft") is None:
        # transformers would load the base weights alone, silently
        raise MissingExtraError(f"{cfg.path} is a LoRA student (base + adapter): loading it needs peft "
                                "(pip install 'distillery[lora]')")
    dtype = "auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    model = AutoModelForCausalLM.from_pretrained(
        cfg.path, dtype=dtype, trust_remote_code=cfg.trust_remote_code
    )
    return model.to(resolve_device(cfg.device))


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A randomly initialised Llama-architecture model sized by ``cfg``, for ``tokenizer``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    if cfg.dtype not in ("float32", "auto"):
        model = model.to(DTYPES[cfg.dtype])
    return model.to(resolve_device(cfg.device))


def read_meta(model_dir: str | Path) -> dict:
    """The ``distillery.json`` a saved model carries, or {} when it has none."""
    p = Path(model_dir) / "distillery.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters, counting tied weights once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
