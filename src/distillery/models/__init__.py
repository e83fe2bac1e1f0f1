"""Causal LMs and tokenizers: load from a path or hub id, build small ones, save as HF dirs.

LoRA/QLoRA adapters, gradient checkpointing and the final (merged) student: :mod:`.lora`;
writing a model directory (plain or base + adapter): :mod:`.saving`.
"""

from distillery.models.loading import (
    build_model,
    count_params,
    load_model,
    load_tokenizer,
    read_meta,
    resolve_device,
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
from distillery.models.saving import merge_adapter, save_model
from distillery.models.tokenizer import train_tokenizer
from distillery.models.vocab import (
    TokenizerComparison,
    VocabMapping,
    VocabMismatchError,
    build_vocab_mapping,
    compare_tokenizers,
    require_shared_vocab,
    token_bytes,
    token_strings,
)

__all__ = [
    "TokenizerComparison",
    "VocabMapping",
    "VocabMismatchError",
    "apply_lora",
    "build_model",
    "build_vocab_mapping",
    "check_qlora_available",
    "compare_tokenizers",
    "count_params",
    "enable_gradient_checkpointing",
    "finalize_student",
    "is_peft_model",
    "load_model",
    "load_model_for_training",
    "load_tokenizer",
    "prepare_for_training",
    "read_meta",
    "require_shared_vocab",
    "resolve_device",
    "merge_adapter",
    "save_model",
    "token_bytes",
    "token_strings",
    "train_tokenizer",
]
