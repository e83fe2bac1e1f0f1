"""``distillery train``: data → tokenizer → model → training loop → a saved HF directory.

The job writes into ``<output_dir>.tmp`` and renames it to ``output_dir`` only when the model
is saved, so ``output_dir`` is always a complete model. Checkpoints go to
``<output_dir>.checkpoints`` (``train.checkpoint.dir``); ``resume=True`` continues from the
newest one, and they are removed once the final model is in place. Under ``accelerate
launch`` every process runs this function; only the main one writes the model.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from accelerate.utils import set_seed
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from distillery.config import DataConfig, TrainJobConfig
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
from distillery.models.vocab import (
    TokenizerComparison,
    build_vocab_mapping,
    compare_tokenizers,
    require_shared_vocab,
)
from distillery.records import ground_truth_records, read_jsonl, validate_sft_records
from distillery.tasks import load_problems
from distillery.train.cached import CachedCollator, CachedSFTDataset
from distillery.train.checkpoint import latest_checkpoint
from distillery.train.cross_tokenizer import (
    CrossTokenizerCollator,
    CrossTokenizerDataset,
    CrossTokenizerKDObjective,
)
from distillery.train.data import Collator, SFTDataset
from distillery.train.finetune_teacher import finetune_teacher
from distillery.train.loop import TrainResult, process_state, train_loop
from distillery.train.objectives import Objective, build_objective
from distillery.train.packing import PackedCollator, check_packing
from distillery.train.preference import prepare_preference_training
from distillery.train.reward import prepare_reward_training
from distillery.train.sampling import unwrap

console = Console(stderr=True)


def load_training_records(data: DataConfig, objective: str = "sft") -> list[dict]:
    """Records from a JSONL file, or generated from the task with ground-truth targets.

    "messages" records for every objective but ``preference``, whose prompt/chosen/rejected
    records are checked by :func:`~distillery.train.preference.prepare_preference_training`.
    """
    if data.path is not None:
        records = read_jsonl(data.path)
        if objective != "preference":
            validate_sft_records(records, data.path)
        return records[: data.num_examples]
    assert data.task is not None
    problems = load_problems(data.task, "train", data.num_examples, seed=data.seed)
    return ground_truth_records(problems, data.target)


def checkpoint_dir(cfg: TrainJobConfig) -> Path:
    """Where a job's checkpoints go: ``train.checkpoint.dir`` or ``<output_dir>.checkpoints``."""
    if cfg.train.checkpoint.dir:
        return Path(cfg.train.checkpoint.dir)
    out = Path(cfg.output_dir)
    return out.with_name(out.name + ".checkpoints")


def _prepare_dirs(cfg: TrainJobConfig, resume: bool, main: bool) -> Path:
    """The ``.tmp`` directory the job writes into; a fresh run refuses to bury a crashed one."""
    out = Path(cfg.output_dir)
    tmp, ckpt = out.with_name(out.name + ".tmp"), checkpoint_dir(cfg)
    if main:
        if not resume and latest_checkpoint(ckpt) is not None:
            raise FileExistsError(
                f"{ckpt} holds checkpoints of an unfinished run ({latest_checkpoint(ckpt).name}): "
                f"continue it with `distillery train CONFIG --resume`, or delete {ckpt} to start over")
        if not resume:
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def _tokenizer(cfg: TrainJobConfig, records: list[dict]) -> PreTrainedTokenizerBase:
    path = cfg.tokenizer.path or cfg.model.path
    if path:
        return load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.train.objective == "preference":
        raise ValueError("objective 'preference' fine-tunes an existing model: set model.path (or tokenizer.path)")
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


def training_parts(cfg: TrainJobConfig, records: list[dict], tokenizer: PreTrainedTokenizerBase,
                   student: nn.Module, teacher: nn.Module | None, show_progress: bool = True,
                   ) -> tuple[Dataset, Callable, Objective]:
    """``(dataset, collator, objective)`` for ``cfg.train.objective``."""
    train, pad = cfg.train, tokenizer.pad_token_id
    if train.packing:
        check_packing(train.objective, cached=cfg.teacher_cache is not None,
                      relation_weight=train.feature.relation_weight)
    if train.objective == "preference":
        return prepare_preference_training(cfg, records, tokenizer, student, show_progress=show_progress)
    if train.objective == "reward":
        return prepare_reward_training(cfg, records, tokenizer, student, teacher)
    cache = LogitCache(cfg.teacher_cache) if cfg.teacher_cache is not None else None
    shared = None
    if train.objective == "logit_kd":
        teacher_tok, teacher_size = _teacher_tokenizer(cfg, teacher, cache)
        if teacher_tok is not None:
            relation = compare_tokenizers(teacher_tok, tokenizer, teacher_size, unwrap(student).config.vocab_size)
            if relation.kind == "different":
                if train.cross_tokenizer is None:
                    require_shared_vocab(relation)  # raises: names the ids and the objectives that apply
                return cross_tokenizer_parts(cfg, records, tokenizer, teacher_tok, relation, cache)
            if relation.kind == "padded":
                shared = relation.shared
                console.print(f"teacher and student share a tokenizer; vocabularies {relation.teacher_size} "
                              f"and {relation.student_size}: distilling over the shared ids [0, {shared})")
    if cache is not None:
        dataset = CachedSFTDataset(records, tokenizer, train.max_seq_len, cache)
        collator = CachedCollator(pad, k=cache.manifest.k)
    else:
        dataset = SFTDataset(records, tokenizer, train.max_seq_len)
        collator = PackedCollator(pad, train.max_seq_len) if train.packing else Collator(pad)
    objective = build_objective(train, student=student, teacher=teacher,
                                cached=cfg.teacher_cache is not None, tokenizer=tokenizer, shared_vocab=shared)
    return dataset, collator, objective


def _teacher_tokenizer(cfg: TrainJobConfig, teacher: nn.Module | None, cache: LogitCache | None
                       ) -> tuple[PreTrainedTokenizerBase | None, int | None]:
    """The teacher's tokenizer and vocabulary rows, to compare with the student's.

    From ``train.cross_tokenizer.teacher_tokenizer``, else the teacher model's directory, else
    the tokenizer the logit cache was captured with. ``(None, None)`` when there is none to
    read and no cross-tokenizer objective asks for one (then the vocab sizes must agree).
    """
    xt = cfg.train.cross_tokenizer
    source = xt.teacher_tokenizer if xt is not None else None
    if source is None and cfg.teacher is not None:
        source = cfg.teacher.path
    if source is None and cache is not None:
        source = cache.manifest.extra.get("tokenizer")
    size = teacher.config.vocab_size if teacher is not None else (cache.manifest.vocab_size if cache else None)
    if source is None:
        if xt is not None:
            raise ValueError("train.cross_tokenizer needs the teacher's tokenizer: set "
                             "train.cross_tokenizer.teacher_tokenizer (a path or hub id)")
        return None, None
    trust = cfg.teacher.trust_remote_code if cfg.teacher is not None else False
    try:
        return load_tokenizer(source, trust_remote_code=trust), size
    except (OSError, ValueError) as exc:
        if xt is not None:
            raise ValueError(f"train.cross_tokenizer: cannot load the teacher's tokenizer from {source!r} "
                             f"({exc}); set train.cross_tokenizer.teacher_tokenizer") from exc
        return None, None


def cross_tokenizer_parts(cfg: TrainJobConfig, records: list[dict], tokenizer: PreTrainedTokenizerBase,
                          teacher_tok: PreTrainedTokenizerBase, relation: TokenizerComparison,
                          cache: LogitCache | None) -> tuple[Dataset, Callable, Objective]:
    """Dataset, collator and objective of ``logit_kd`` from a teacher with another tokenizer."""
    train = cfg.train
    if train.packing:
        raise ValueError("train.packing is not supported with train.cross_tokenizer (each row is aligned "
                         "to the teacher's tokens on its own): set packing false")
    xt = train.cross_tokenizer
    mapping = build_vocab_mapping(teacher_tok, tokenizer, relation.teacher_size, relation.student_size,
                                  prefix=xt.mapping == "prefix")
    console.print(f"cross-tokenizer {xt.resolved_method}: {mapping.n_mapped} of {mapping.n_tokens} teacher "
                  f"tokens map to student tokens ({100 * mapping.coverage:.1f}%; {mapping.n_prefix} by prefix)")
    dataset = CrossTokenizerDataset(records, tokenizer, teacher_tok, train.max_seq_len, cache)
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else (teacher_tok.eos_token_id or 0)
    collator = CrossTokenizerCollator(tokenizer.pad_token_id, teacher_pad_id=pad)
    objective = CrossTokenizerKDObjective(train.resolved_loss(), xt, mapping, cached=cache is not None)
    return dataset, collator, objective


def _teacher(cfg: TrainJobConfig, records: list[dict], tokenizer: PreTrainedTokenizerBase,
             show_progress: bool) -> nn.Module | None:
    """The live teacher, fine-tuned on the training data first when ``teacher_finetune`` says so."""
    if cfg.teacher is None:
        return None
    teacher_cfg = cfg.teacher
    if cfg.teacher_finetune is not None:
        tuned = finetune_teacher(cfg, records, tokenizer, show_progress=show_progress)
        teacher_cfg = teacher_cfg.model_copy(update={"path": str(tuned)})
    return load_model(teacher_cfg)


def run_train_job(cfg: TrainJobConfig, show_progress: bool = True, resume: bool = False) -> TrainResult:
    """Train the configured model and save it (weights, tokenizer, distillery.json) atomically."""
    state = process_state()
    records = load_training_records(cfg.data, cfg.train.objective)
    tokenizer = _tokenizer(cfg, records)
    teacher = _teacher(cfg, records, tokenizer, show_progress)
    model = _student(cfg, tokenizer)
    dataset, collator, objective = training_parts(cfg, records, tokenizer, model, teacher, show_progress)

    tmp = _prepare_dirs(cfg, resume, state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        console.print(f"training {cfg.train.objective} on {len(dataset)} records for {cfg.train.steps} steps"
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
    # replace the old output only once the new one is complete
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    shutil.rmtree(checkpoint_dir(cfg), ignore_errors=True)  # the model is safe now
    console.print(f"saved {out} (final loss {result.final_loss:.4f}, {result.seconds:.0f}s)")
