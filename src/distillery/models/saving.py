"""Save a model as a plain Hugging Face directory: full weights, or base weights + LoRA adapter.

Separate from :mod:`.loading` because saving must know the peft layout (:mod:`.lora`), which is
itself built on loading; keeping it here keeps ``loading -> lora -> saving`` one-way.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distillery.errors import DistilleryError, MissingInputError
from distillery.files import disk_space
from distillery.models.loading import load_model, load_tokenizer
from distillery.models.lora import is_peft_model, peft_module, save_peft_model
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


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out: str | Path,
                  meta: dict | None = None) -> Path:
    """Write ``base_dir`` with the LoRA adapter of ``adapter_dir`` merged in, as a plain HF
    directory ``out`` (the base's tokenizer and generation config kept).

    ``adapter_dir``: a peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``);
    its ``base_model_name_or_path`` is ignored: the adapter goes on ``base_dir``. A tensor that
    does not fit the base (another model's adapter) raises, naming the directory.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MissingInputError(f"{adapter_dir}: no adapter_config.json; teacher.adapter must be a peft "
                                "LoRA directory (a train job with lora.merge: false writes one)")
    peft = peft_module()
    base = load_model(str(base_dir), device="cpu")
    try:
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise DistilleryError(f"{adapter_dir}: the adapter does not fit the model in {base_dir} "
                              f"({str(exc).splitlines()[0]}); was it trained on another model?") from None
    merged = model.merge_and_unload()
    tokenizer = load_tokenizer(str(base_dir))
    return save_model(merged, tokenizer, out, meta=meta)
