"""LoRA and QLoRA students (and teachers) through peft, gradient checkpointing, final students.

``load_model_for_training(model_cfg, lora)`` is the one way a model to be trained is loaded:
plain (full fine-tuning), with LoRA adapters, or 4-bit quantized with LoRA adapters (QLoRA:
bitsandbytes, CUDA only, refused with a clear error before anything is loaded otherwise).
``finalize_student(model, lora)`` turns the trained model into what is saved: the adapters
merged into a plain Hugging Face model (``lora.merge``, the default), or the peft model kept
as base weights + adapter, which ``distillery.models.save_model`` writes in the layout
transformers loads by itself when peft is installed.

peft is an optional dependency (``pip install 'distillery[lora]'``): it is imported only when
LoRA is asked for.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from distillery.config import ConfigError, LoraConfig, ModelConfig
from distillery.errors import DistilleryError, MissingExtraError
from distillery.models.loading import (
    DTYPES,
    check_model_source,
    hub_errors,
    load_model,
    resolve_device,
)

if TYPE_CHECKING:
    from peft import PeftModel


class QLoRAUnavailableError(DistilleryError, RuntimeError):
    """``lora.quantize: 4bit`` asked for where it cannot run (no bitsandbytes, no CUDA GPU)."""


def peft_module() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise MissingExtraError("LoRA (train.lora) needs peft: pip install 'distillery[lora]'") from exc
    return peft


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (without importing peft when nothing did)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


# --------------------------------------------------------------------------- adapters


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct short names (``q_proj``, ``down_proj``, ...) of the model's linear layers.

    These are what ``train.lora.target_modules`` lists; GPT-2 style ``Conv1D`` layers count.
    """
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D")
    }
    return sorted(names)


def _check_target_modules(model: nn.Module, targets: list[str]) -> None:
    """Every entry of a target list must name some module (peft ignores a typo beside a match).

    peft matches a list entry against a module's full dotted name or its dotted suffix.
    """
    names = [name for name, _ in model.named_modules() if name]
    linear = linear_module_names(model)
    for target in targets:
        if any(name == target or name.endswith("." + target) for name in names):
            continue
        close = difflib.get_close_matches(target, linear, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"train.lora.target_modules: '{target}' matches no module of {type(model).__name__}. "
            f"{hint}Its linear layers are: {', '.join(linear)} (or use 'all-linear')"
        )


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, *, seed: int = 0) -> PeftModel:
    """Wrap ``model`` in LoRA adapters (peft, ``CAUSAL_LM``); only the adapters train.

    ``target_modules: all-linear`` is peft's own: every linear layer but the output head.
    The adapters' random initialisation is drawn from ``seed`` (the global generators are left
    as they were), so a run is reproducible and every process of a multi-process run starts
    from the same adapters.
    """
    peft = peft_module()
    if cfg.target_modules != "all-linear":
        _check_target_modules(model, cfg.target_modules)
    peft_cfg = peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules, task_type="CAUSAL_LM",
    )
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            return peft.get_peft_model(model, peft_cfg)
    except ImportError as exc:
        # peft >= 0.18 refuses an old torchao (torchtune 0.6 pins 0.10) for any LoRA layer
        raise MissingExtraError(
            f"peft cannot create LoRA layers in this environment: {exc}. "
            "Upgrade torchao (pip install -U torchao) or uninstall it"
        ) from exc


# --------------------------------------------------------------------------- loading


def check_qlora_available(model_cfg: ModelConfig) -> None:
    """Raise before anything heavy happens when QLoRA (``lora.quantize: 4bit``) cannot run here."""
    problems = []
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("bitsandbytes is not installed")
    if not torch.cuda.is_available():
        problems.append(f"no CUDA device (torch {torch.__version__})")
    elif resolve_device(model_cfg.device).type != "cuda":
        problems.append(f"model.device is {model_cfg.device!r}, not a CUDA device")
    if model_cfg.path is None:
        problems.append("no model.path (QLoRA quantizes a pretrained model)")
    if problems:
        raise QLoRAUnavailableError(
            "QLoRA needs bitsandbytes and a CUDA GPU; found: " + "; ".join(problems)
            + "; use lora.quantize: none (plain LoRA)"
        )


def _load_4bit(model_cfg: ModelConfig, gradient_checkpointing: bool) -> PreTrainedModel:
    """The base model quantized to 4-bit NF4 (double quantization), ready for k-bit training.

    The adapters compute in ``model.dtype`` (``auto``: bfloat16); peft's
    ``prepare_model_for_kbit_training`` freezes the base and upcasts its norms to float32.
    """
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if model_cfg.dtype == "auto" else DTYPES[model_cfg.dtype]
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    device = resolve_device(model_cfg.device)
    local = check_model_source(model_cfg.path)
    with hub_errors(model_cfg.path, local):
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.path, quantization_config=quant, dtype=compute,
            device_map={"": device.index or 0}, trust_remote_code=model_cfg.trust_remote_code,
        )
    return peft_module().prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def load_model_for_training(
    model_cfg: ModelConfig, lora: LoraConfig | None, *, gradient_checkpointing: bool = False,
    seed: int = 0,
) -> PreTrainedModel | PeftModel:
    """The model ``model_cfg.path`` names, ready to train: full, LoRA, or QLoRA (``lora.quantize``).

    ``seed`` (use ``train.seed``) draws the adapters' initialisation.
    """
    if lora is not None and lora.quantize == "4bit":
        check_qlora_available(model_cfg)
        return apply_lora(_load_4bit(model_cfg, gradient_checkpointing), lora, seed=seed)
    return prepare_for_training(load_model(model_cfg), lora, gradient_checkpointing=gradient_checkpointing,
                                seed=seed)


def prepare_for_training(
    model: PreTrainedModel, lora: LoraConfig | None, *, gradient_checkpointing: bool = False,
    seed: int = 0,
) -> PreTrainedModel | PeftModel:
    """LoRA adapters and/or gradient checkpointing on a loaded (or freshly built) model."""
    if lora is not None and lora.quantize == "4bit":
        raise ValueError("lora.quantize: 4bit loads the model quantized: use load_model_for_training")
    if lora is not None:
        model = apply_lora(model, lora, seed=seed)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    Non-reentrant ``torch.utils.checkpoint``: it needs no input that requires grad, so frozen
    embeddings under LoRA work as they are. Active in training mode only.
    """
    target = model.get_base_model() if is_peft_model(model) else model
    if not getattr(target, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(target).__name__} does not support gradient checkpointing; "
                          "set train.gradient_checkpointing: false")
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.x name
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


# --------------------------------------------------------------------------- the final model


def finalize_student(model: nn.Module, lora_cfg: LoraConfig | None) -> nn.Module:
    """What is saved after training: a plain merged model (``lora.merge``) or the peft model.

    A QLoRA model is merged into the base reloaded unquantized (``model.dtype``) from its
    path: merging into 4-bit weights would round the update away and the result would still
    need bitsandbytes. Gradient checkpointing is turned off (it only slows inference).
    """
    if lora_cfg is None or not is_peft_model(model):
        _disable_checkpointing(model)
        return model
    if not lora_cfg.merge:
        _disable_checkpointing(model.get_base_model())
        return model
    merged = _merge_quantized(model) if _is_quantized(model) else model.merge_and_unload()
    _disable_checkpointing(merged)
    return merged


def _disable_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "is_activation_checkpointing"):  # transformers >= 5.x names
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


def _is_quantized(model: nn.Module) -> bool:
    base = model.get_base_model() if is_peft_model(model) else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def _merge_quantized(model: PeftModel) -> PreTrainedModel:
    """The trained adapter merged into an unquantized copy of the base model."""
    peft = peft_module()
    base = model.get_base_model()
    quant = base.config.quantization_config
    compute = getattr(quant, "bnb_4bit_compute_dtype", None) or torch.bfloat16
    plain = AutoModelForCausalLM.from_pretrained(base.name_or_path, dtype=compute)
    plain = plain.to(next(base.parameters()).device)
    name = model.active_adapter
    copy = peft.get_peft_model(plain, model.peft_config[name])
    peft.set_peft_model_state_dict(copy, peft.get_peft_model_state_dict(model, adapter_name=name))
    return copy.merge_and_unload()


_LOAD_README = """# LoRA student (adapter not merged)

This directory holds the base model's weights (`model.safetensors`, `config.json`) and a LoRA
adapter (`adapter_config.json`, `adapter_model.safetensors`). With peft installed,
transformers loads both:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")  # base + adapter (needs `pip install peft`)

Without peft, transformers loads the base model alone, silently. To serve the adapter with vLLM:
`LLM(model=DIR, enable_lora=True)` and `LoRARequest("student", 1, DIR)`. For one plain
model, merge it: `model.merge_and_unload()` (or train with `lora.merge: true`).
"""

_LOAD_README_QUANTIZED = """# QLoRA student (adapter only)

This directory holds a LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`) trained
on the 4-bit quantized base model `{base}`. Load the base, then the adapter:

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "path/to/this/dir")
"""


def save_peft_model(model: PeftModel, out: Path) -> None:
    """Write an unmerged peft model: base weights + adapter, or the adapter alone under QLoRA.

    The base weights are the model's state without the adapter (``lora_*`` tensors dropped,
    ``.base_layer.`` names restored), so the directory is a complete HF model that
    transformers (with peft installed) loads with the adapter attached.
    """
    if _is_quantized(model):
        base = model.get_base_model().name_or_path
        model.save_pretrained(out, safe_serialization=True)
        (out / "README.md").write_text(_LOAD_README_QUANTIZED.format(base=base))
        return
    base = model.get_base_model()
    state = {
        key.replace(".base_layer.", "."): value
        for key, value in base.state_dict().items()
        if "lora_" not in key
    }
    base.save_pretrained(out, state_dict=state, safe_serialization=True)
    model.save_pretrained(out, safe_serialization=True)  # adapter_config.json + adapter_model.safetensors
    (out / "README.md").write_text(_LOAD_README)


