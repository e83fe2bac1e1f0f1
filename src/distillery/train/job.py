"""``distillery train``: data → tokenizer → model → training loop → a saved HF directory.

The job writes into ``<output_dir>.tmp`` and swaps it in for ``output_dir`` by renames only
when the model is saved (:func:`distillery.outputs.replace_dir`), so ``output_dir`` is always a
complete model, even after a kill. Checkpoints go to ``<output_dir>.checkpoints``
(``train.checkpoint.dir``); ``resume=True`` continues from the newest one, and they are removed
once the final model is in place. Every directory the job writes carries the ``.distillery``
marker; one with a user's files and no marker is refused before any training, never deleted.
Under ``accelerate launch`` every process runs this function; only the main one writes the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from accelerate.utils import set_seed
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from distillery.config import ConfigError, TrainJobConfig
from distillery.logits.cache import LogitCache
from distillery.models import (
    build_model,
    check_qlora_available,
    finalize_student,
    load_model,
    load_model_for_training,
    load_tokenizer,
    prepare_for_training,
    save_model,
    train_tokenizer,
)
from distillery.models.prune import calibration_records, prune_model
from distillery.outputs import check_replaceable, claim_dir, remove_dir, replace_dir
from distillery.tasks import load_records
from distillery.train.checkpoint import CheckpointError, latest_checkpoint
from distillery.train.finetune_teacher import finetune_teacher
from distillery.train.loop import TrainResult, process_state, train_loop
from distillery.train.objectives import (
    BuildContext,
    Objective,
    build_training_parts,
    describe,
    objective_needs,
)
from distillery.train.sampling import unwrap

console = Console(stderr=True)


def checkpoint_dir(cfg: TrainJobConfig) -> Path:
    """Where a job's checkpoints go: ``train.checkpoint.dir`` or ``<output_dir>.checkpoints``."""
    if cfg.train.checkpoint.dir:
        return Path(cfg.train.checkpoint.dir)
    out = Path(cfg.output_dir)
    return out.with_name(out.name + ".checkpoints")


TRAIN = "distillery train"
OUT_HINT = "choose another output_dir, or move the files out of it"
CKPT_HINT = "set train.checkpoint.dir to another directory, or move the files out of it"


def _prepare_dirs(cfg: TrainJobConfig, resume: bool, main: bool) -> Path:
    """The ``.tmp`` directory the job writes into; a fresh run refuses to bury a crashed one.

    Runs before anything heavy loads, so a user's directory named as ``output_dir`` or
    ``train.checkpoint.dir`` is refused at once rather than after the training."""
    out = Path(cfg.output_dir)
    tmp, ckpt = out.with_name(out.name + ".tmp"), checkpoint_dir(cfg)
    if main:
        check_replaceable(out, TRAIN, OUT_HINT)  # also recovers a swap that a kill interrupted
        check_replaceable(ckpt, TRAIN, CKPT_HINT)
        if not resume and latest_checkpoint(ckpt) is not None:
            raise CheckpointError(
                f"{ckpt} holds checkpoints of an unfinished run ({latest_checkpoint(ckpt).name}): "
                f"continue it with `distillery train CONFIG --resume`, or delete {ckpt} to start over")
        if not resume:
            remove_dir(tmp, TRAIN, OUT_HINT)
        claim_dir(tmp, TRAIN, OUT_HINT)
    return tmp


def _tokenizer(cfg: TrainJobConfig, records: list[dict]) -> PreTrainedTokenizerBase:
    path = cfg.tokenizer.path or cfg.model.path
    if path:
        return load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    if not objective_needs(cfg.train.objective).messages:
        raise ValueError(f"objective '{cfg.train.objective.name}' fine-tunes an existing model (its records "
                         "are not conversations a tokenizer could be trained on): set model.path "
                         "(or tokenizer.path)")
    tok = cfg.tokenizer
    return train_tokenizer((m["content"] for r in records for m in r["messages"]), vocab_size=tok.vocab_size,
                           algorithm=tok.algorithm, split_digits=tok.split_digits)


def _student(cfg: TrainJobConfig, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """The model that trains: loaded or built, then LoRA (QLoRA) and gradient checkpointing."""
    lora, train = cfg.train.lora, cfg.train
    if lora is not None and lora.quantize == "4bit":
        check_qlora_available(cfg.model)  # before anything heavy loads
    kw = {"gradient_checkpointing": train.gradient_checkpointing, "seed": train.seed}
    set_seed(train.seed)  # a new model's random init is part of the run, like its data order
    if cfg.model.path:
        return load_model_for_training(cfg.model, lora, **kw)
    return prepare_for_training(build_model(cfg.model, tokenizer), lora, **kw)


def pruned_dir(cfg: TrainJobConfig) -> Path:
    """Where ``model.prune`` writes the student before training: ``model.prune.output_dir``,
    else ``<output_dir>.pruned``."""
    if cfg.model.prune is not None and cfg.model.prune.output_dir is not None:
        return Path(cfg.model.prune.output_dir)
    out = Path(cfg.output_dir)
    return out.with_name(out.name + ".pruned")


def _pruned_student(cfg: TrainJobConfig, records: list[dict], main: bool) -> TrainJobConfig:
    """With ``model.prune``: prune its source once into :func:`pruned_dir` (kept while the source,
    the settings and the calibration records stay the same) and train that directory."""
    prune = cfg.model.prune
    if prune is None:
        return cfg
    if prune.source == "teacher":
        raise ConfigError("model.prune.source: 'teacher' names the run's teacher and works only in "
                          "`distillery run`; in a train config give the directory of the model to prune")
    calibration = (records if prune.calibration == "data"
                   else calibration_records(prune.calibration, prune.num_examples))
    out = pruned_dir(cfg)
    if main:
        meta = prune_model(prune, out, calibration, made_by=TRAIN, hint=OUT_HINT)
        layers = meta.get("depth", {}).get("kept_layers")
        console.print(("reusing" if meta.get("reused") else "pruned") + f" {prune.source} into {out} "
                      f"({meta['params']['pruned']:,} of {meta['params']['source']:,} parameters"
                      + (f"; layers {layers}" if layers else "") + ")")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(out), "prune": None})})


def training_parts(cfg: TrainJobConfig, records: list[dict], tokenizer: PreTrainedTokenizerBase,
                   student: nn.Module, teacher: nn.Module | None, show_progress: bool = True,
                   ) -> tuple[Dataset, Callable, Objective]:
    """``(dataset, collator, objective)`` of ``cfg.train.objective``, built by its registry entry."""
    cache = LogitCache(cfg.teacher_cache) if cfg.teacher_cache is not None else None
    return build_training_parts(BuildContext(cfg, records, tokenizer, student, teacher, cache, show_progress))


def _teacher(cfg: TrainJobConfig, records: list[dict], tokenizer: PreTrainedTokenizerBase,
             show_progress: bool) -> nn.Module | None:
    """The live teacher, fine-tuned on the training data first when ``teacher_finetune`` says so.

    None when the objective needs none (a configured teacher is then not loaded).
    """
    if cfg.teacher is None or objective_needs(cfg.train.objective).live_teacher == "no":
        return None
    teacher_cfg = cfg.teacher
    if cfg.teacher_finetune is not None:
        tuned = finetune_teacher(cfg, records, tokenizer, show_progress=show_progress)
        teacher_cfg = teacher_cfg.model_copy(update={"path": str(tuned)})
    return load_model(teacher_cfg)


def run_train_job(cfg: TrainJobConfig, show_progress: bool = True, resume: bool = False) -> TrainResult:
    """Train the configured model and save it (weights, tokenizer, distillery.json) atomically."""
    state = process_state()
    tmp = _prepare_dirs(cfg, resume, state.is_main_process)
    records = load_records(cfg.data, validate=objective_needs(cfg.train.objective).messages)
    cfg = _pruned_student(cfg, records, state.is_main_process)
    state.wait_for_everyone()  # the other processes load the directory the main one pruned
    tokenizer = _tokenizer(cfg, records)
    teacher = _teacher(cfg, records, tokenizer, show_progress)
    model = _student(cfg, tokenizer)
    dataset, collator, objective = training_parts(cfg, records, tokenizer, model, teacher, show_progress)
    state.wait_for_everyone()
    if state.is_main_process:
        console.print(f"training {describe(cfg.train.objective)} on {len(dataset)} records for {cfg.train.steps} steps"
                      + (f" on {state.num_processes} processes" if state.num_processes > 1 else ""))
    result = train_loop(
        model, objective, dataset, collator, cfg.train, teacher=teacher,
        log_path=tmp / "train_log.jsonl", show_progress=show_progress,
        checkpoint_dir=checkpoint_dir(cfg), resume=resume, run_config=cfg.model_dump(mode="json"),
        place_teacher=cfg.teacher is None or cfg.teacher.device == "auto",
    )
    if result.resumed_from and state.is_main_process:
        console.print(f"resumed after step {result.resumed_from}")
    if state.is_main_process:
        _save_final(cfg, finalize_student(unwrap(model), cfg.train.lora), tokenizer, tmp, result)
    state.wait_for_everyone()
    return result


def _save_final(cfg: TrainJobConfig, model: object, tokenizer: object, tmp: Path, result: TrainResult) -> None:
    out = Path(cfg.output_dir)
    meta = {"config": cfg.model_dump(mode="json"), "steps": result.steps, "seconds": result.seconds,
            "final_loss": result.final_loss, "resumed_from": result.resumed_from,
            "task": cfg.data.task.model_dump(mode="json") if cfg.data.task else None}
    save_model(model, tokenizer, tmp, meta=meta, state_dict=result.state_dict)
    replace_dir(tmp, out, TRAIN, OUT_HINT)  # the old output goes only once the new one is complete
    remove_dir(checkpoint_dir(cfg), TRAIN, CKPT_HINT)  # the model is safe now
    loss = "unknown" if result.final_loss is None else f"{result.final_loss:.4f}"
    console.print(f"saved {out} (final loss {loss}, {result.seconds:.0f}s)")
