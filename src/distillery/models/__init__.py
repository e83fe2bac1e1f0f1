"""Causal LMs and tokenizers: load from a path or hub id, build small ones, save as HF dirs.

LoRA/QLoRA adapters, gradient checkpointing and the final (merged) student: :mod:`.lora`.
"""

from distillery.models.loading import (
    build_model,
    count_params,
    load_model,
    load_tokenizer,
    read_meta,
    resolve_device,
    save_model,
)
from distillery.models.lora import (
    apply_lora,
    check_qlora_available,
    enable_gradient_checkpointing,
    finalize_student,
    is_peft_model,
    load_model_for_training,
    prepare_for_training,
)
from distillery.models.tokenizer import train_tokenizer

__all__ = [
    "apply_lora",
    "build_model",
    "check_qlora_available",
    "count_params",
    "enable_gradient_checkpointing",
    "finalize_student",
    "is_peft_model",
    "load_model",
    "load_model_for_training",
    "load_tokenizer",
    "prepare_for_training",
    "read_meta",
    "resolve_device",
    "save_model",
    "train_tokenizer",
]
