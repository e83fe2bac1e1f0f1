"""Load causal LMs and tokenizers through transformers, and build small ones (saving: :mod:`.saving`)."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hf_constants
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distillery.config import ConfigError, ModelConfig
from distillery.errors import CorruptFileError, MissingExtraError, MissingInputError
from distillery.files import read_json

# config dtype names -> torch dtypes (model.dtype "auto" keeps the checkpoint's own)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' → the first CUDA device if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "org/name"


def check_model_source(source: str, weights: bool = True) -> bool:
    """Check a model's ``source`` before transformers loads it; whether it is a local directory.

    A local directory's JSON files (config, tokenizer) must parse and, with ``weights``, its
    ``*.safetensors`` files must be whole: a truncated or corrupt file is an error naming it,
    not a deserializer traceback. A path that does not exist and cannot be a hub id ("org/name")
    is a missing directory, not transformers' "Repo id must be in the form ...". A hub id is
    left to transformers (see :func:`hub_errors`).
    """
    path = Path(source)
    if path.is_dir():
        for file in sorted(path.glob("*.json")):
            read_json(file, what="the model directory is incomplete: copy or save it again")
        for file in sorted(path.glob("*.safetensors")) if weights else []:
            try:
                with safe_open(file, "pt"):
                    pass  # opening validates the header against the file's size
            except SafetensorError as exc:
                raise CorruptFileError(f"{file}: truncated or corrupt weights file ({exc}): copy or "
                                       "save the model again") from None
        return True
    if path.exists():
        raise MissingInputError(f"{source} is a file: give the model's directory")
    if path.is_absolute() or source.startswith(("./", "../", "~")) or not _HUB_ID.fullmatch(source):
        raise MissingInputError(f"model directory not found: {source}")
    return False


@contextmanager
def hub_errors(source: str, local: bool) -> Iterator[None]:
    """A hub id that cannot be fetched (offline, not cached, unknown): an error naming it.
    ``local`` (from :func:`check_model_source`): a local directory, whose errors pass as they are."""
    try:
        yield
    except OSError as exc:
        if local:
            raise
        if hf_constants.HF_HUB_OFFLINE:
            raise MissingInputError(
                f"model directory not found: {source}; as a hub id it is not in the local cache "
                "and HF_HUB_OFFLINE is set, so nothing is downloaded: give an existing model "
                "directory, or unset HF_HUB_OFFLINE to download it") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MissingInputError(f"model directory not found: {source}; loading it as a hub id "
                                f"failed: {first}") from None


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory or hub id, with a pad token guaranteed."""
    local = check_model_source(path, weights=False)
    with hub_errors(path, local):
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
    local = check_model_source(cfg.path)
    if (path / "adapter_config.json").is_file() and importlib.util.find_spec("peft") is None:
        # transformers would load the base weights alone, silently
        raise MissingExtraError(f"{cfg.path} is a LoRA student (base + adapter): loading it needs peft "
                                "(pip install 'distillery[lora]')")
    dtype = "auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    with hub_errors(cfg.path, local):
        if cfg.init == "random":  # same architecture, fresh weights (the caller seeds torch)
            config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_config(config, dtype=None if dtype == "auto" else dtype,
                                                     trust_remote_code=cfg.trust_remote_code)
        else:
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
    return read_json(p) if p.is_file() else {}


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters, counting tied weights once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
