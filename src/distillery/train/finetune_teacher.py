"""The teacher fine-tuning step of torchtune's KD recipe: SFT the teacher on the target data first.

A teacher that has seen the task's format gives the student sharper, more useful distributions.
``finetune_teacher`` trains ``job_cfg.teacher`` with ``job_cfg.teacher_finetune`` (objective
``sft``, usually LoRA), merges the adapters and saves a plain HF directory at
``<output_dir>.teacher_ft``. Its ``distillery.json`` records a fingerprint of what it was made
from (the teacher's files, the fine-tuning config, the records), so a re-run with the same
inputs reuses it and any change retrains it.
"""

from __future__ import annotations

import os
from pathlib import Path

from accelerate import PartialState
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from distillery.config import ModelConfig, TrainConfig, TrainJobConfig, config_hash
from distillery.models import (
    finalize_student,
    load_model_for_training,
    load_tokenizer,
    read_meta,
    save_model,
)
from distillery.outputs import check_replaceable, claim_dir, remove_dir, replace_dir
from distillery.train.loop import train_loop
from distillery.train.objectives import BuildContext, build_training_parts

console = Console(stderr=True)

FT = "distillery train (teacher_finetune)"
FT_HINT = "move the files out of it, or choose another output_dir (the fine-tuned teacher goes beside it)"


def teacher_finetune_dir(job_cfg: TrainJobConfig) -> Path:
    """Where the fine-tuned teacher lives: ``<output_dir>.teacher_ft`` beside the student."""
    out = Path(job_cfg.output_dir)
    return out.with_name(out.name + ".teacher_ft")


def files_signature(path: str) -> list[tuple[str, int, int]] | str:
    """Name, size and mtime of each file of a local model directory (a hub id: the id itself)."""
    p = Path(path)
    if not p.is_dir():
        return path
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.iterdir()) if f.is_file()]


def finetune_fingerprint(teacher: ModelConfig, ft_cfg: TrainConfig, records: list[dict]) -> str:
    """What the fine-tuned teacher depends on: the teacher (config and files), the config, the data.

    Only the conversations count: provenance in ``meta`` (e.g. a record's creation time)
    does not change what the teacher learns.
    """
    texts = [r.get("messages") for r in records]
    return config_hash(teacher, files_signature(teacher.path), ft_cfg, texts)


def _teacher_tokenizer(teacher: ModelConfig, fallback: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The teacher learns its data in its own tokenization; ``fallback`` if it ships none."""
    try:
        return load_tokenizer(teacher.path, trust_remote_code=teacher.trust_remote_code)
    except (OSError, ValueError):
        return fallback


def finetune_teacher(
    job_cfg: TrainJobConfig, records: list[dict], tokenizer: PreTrainedTokenizerBase,
    show_progress: bool = True,
) -> Path:
    """SFT ``job_cfg.teacher`` on ``records`` with ``job_cfg.teacher_finetune``; returns its directory.

    The directory is reused when its fingerprint matches; otherwise the teacher is trained,
    merged (LoRA adapters always are: a teacher is used for inference) and written to a
    temporary directory that replaces the old one only once complete.
    """
    ft_cfg, teacher = job_cfg.teacher_finetune, job_cfg.teacher
    if ft_cfg is None or teacher is None or teacher.path is None:
        raise ValueError("finetune_teacher needs teacher.path and teacher_finetune in the train config")
    out = teacher_finetune_dir(job_cfg)
    fingerprint = finetune_fingerprint(teacher, ft_cfg, records)
    if out.is_dir() and read_meta(out).get("fingerprint") == fingerprint:
        console.print(f"reusing the fine-tuned teacher {out} (same teacher, config and data)")
        return out

    tok = _teacher_tokenizer(teacher, tokenizer)
    model = load_model_for_training(teacher, ft_cfg.lora, gradient_checkpointing=ft_cfg.gradient_checkpointing,
                                    seed=ft_cfg.seed)
    # the teacher is this job's student: built by teacher_finetune.objective's registry entry
    ft_job = job_cfg.model_copy(update={"model": teacher, "train": ft_cfg, "teacher": None,
                                        "teacher_cache": None, "teacher_finetune": None})
    dataset, collate, objective = build_training_parts(
        BuildContext(ft_job, records, tok, model, show_progress=show_progress))
    # under `accelerate launch` every process trains its share and the main one alone writes;
    # the process group is the loop's to set up, so before it the rank comes from the launcher
    tmp = out.with_name(out.name + ".tmp")
    if os.environ.get("RANK", "0") == "0":
        check_replaceable(out, FT, FT_HINT)  # before the fine-tuning, not after it
        remove_dir(tmp, FT, FT_HINT)
        claim_dir(tmp, FT, FT_HINT)
        console.print(f"fine-tuning the teacher {teacher.path} on {len(dataset)} records for {ft_cfg.steps} steps")
    result = train_loop(model, objective, dataset, collate, ft_cfg,
                        log_path=tmp / "train_log.jsonl", show_progress=show_progress)
    merge = ft_cfg.lora.model_copy(update={"merge": True}) if ft_cfg.lora is not None else None
    teacher_ft = finalize_student(model, merge)
    state = PartialState()
    if state.is_main_process:
        meta = {"fingerprint": fingerprint, "teacher": teacher.path,
                "teacher_finetune": ft_cfg.model_dump(mode="json"), "records": len(records),
                "steps": result.steps, "seconds": result.seconds, "final_loss": result.final_loss}
        save_model(teacher_ft, tok, tmp, meta=meta)
        replace_dir(tmp, out, FT, FT_HINT)
        console.print(f"saved the fine-tuned teacher {out} (final loss {result.final_loss:.4f})")
    state.wait_for_everyone()
    return out
