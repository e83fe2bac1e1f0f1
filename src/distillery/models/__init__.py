"""Causal LMs and tokenizers: load from a path or hub id, build small ones, save as HF dirs."""

from distillery.models.loading import (
    build_model,
    count_params,
    load_model,
    load_tokenizer,
    read_meta,
    resolve_device,
    save_model,
)
from distillery.models.tokenizer import train_tokenizer

__all__ = [
    "build_model",
    "count_params",
    "load_model",
    "load_tokenizer",
    "read_meta",
    "resolve_device",
    "save_model",
    "train_tokenizer",
]
