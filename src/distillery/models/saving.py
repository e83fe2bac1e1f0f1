"""Save a model as a plain Hugging Face directory: full weights, or base weights + LoRA adapter.

Separate from :mod:`.loading` because saving must know the peft layout (:mod:`.lora`), which is
itself built on loading; keeping it here keeps ``loading -> lora -> saving`` one-way.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillery.files import disk_space
from distillery.models.lora import is_peft_model, save_peft_model
from distillery.records import json_text


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    meta: dict | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Save a plain HF directory (safetensors + tokenizer), loadable without distillery.

    ``state_dict``: the weights to write instead of the model's own (e.g. gathered from FSDP
    shards).

    A peft model (LoRA, not merged) is saved as base weights + adapter, see
    :func:`distillery.models.lora.save_peft_model`. ``meta`` (e.g. the training config) goes
    to ``distillery.json`` beside the weights.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with disk_space(out, "the model (weights, tokenizer)", "the training checkpoints (if any) "
                    "are kept, and a half-written model is never renamed over a finished one"):
        if is_peft_model(model):
            save_peft_model(model, out)
        else:
            model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(out)
        if meta is not None:
            (out / "distillery.json").write_text(json_text(meta, out / "distillery.json", indent=2,
                                                           sort_keys=True))
    return out
