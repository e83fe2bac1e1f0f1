"""The training loop: one plain PyTorch loop on accelerate; objectives plug into it.

Read it top to bottom: seed, build the optimizer and schedule, prepare them with accelerate,
place the teacher, resume from the newest checkpoint if asked, then step:

    for each micro-batch of this process's share of the step's global batch:
        out = objective.loss(batch, student, teacher)   # a LossOutput(loss, count, metrics)
        backward(out.loss × out.count)              # count = units the loss averaged over
    grads ×= processes / global count               # = the mean over the whole global batch
    clip → optimizer → schedule → log → checkpoint

Scaling by the global count (tokens, pairs, ...) instead of averaging per micro-batch makes a
step's gradient the same however the global batch is split over processes and micro-batches,
so two processes reproduce one process's loss curve. The data order is a function of
(seed, step) (:mod:`distillery.train.batches`), which is what makes resume exact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, set_seed
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from distillery.config import TrainConfig
from distillery.train.batches import check_split, global_batch, micro_batches
from distillery.train.checkpoint import (
    CheckpointError,
    config_differences,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from distillery.train.logging import TrainLogger
from distillery.train.objectives.base import LossOutput, Objective
from distillery.train.sampling import unwrap

# keys that may change between a run and its resume (they do not change the result)
RESUMABLE_CHANGES = ("train.checkpoint", "train.trackers", "train.log_every", "output_dir")


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    # the last step's loss; a run resumed from its final checkpoint takes the checkpoint's
    # (None for a checkpoint written before the loss was stored there)
    final_loss: float | None
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0  # the step a resumed run started after (0 = from scratch)
    # FSDP: the student's full weights, gathered from the shards (on the main process only)
    state_dict: dict | None = None


def process_state() -> PartialState:
    """This process's place in the run (rank, world size), set up once per process.

    Without a GPU, processes started by ``accelerate launch --multi_gpu`` (or ``torchrun``)
    join one gloo group on the CPU; accelerate would otherwise treat each as a lone run.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def _optimizer(model: nn.Module, extra: list[nn.Module], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on ≥2-D non-norm weights only."""
    decay, no_decay = [], []
    for module in [model, *extra]:
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _place_teacher(teacher: nn.Module | None, accelerator: Accelerator, cfg: TrainConfig,
                   place: bool) -> nn.Module | None:
    """The teacher never trains: eval mode, no grads; never silently copied whole to every rank.

    The job passes a teacher only to an objective that uses one (see ``ObjectiveNeeds``).
    """
    if teacher is None:
        return None
    teacher = teacher.eval().requires_grad_(False)
    if accelerator.num_processes > 1:
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        sharding = cfg.teacher_sharding if cfg.teacher_sharding != "auto" else ("fsdp" if fsdp else None)
        if sharding is None:
            raise ValueError(
                f"{accelerator.num_processes} processes would each hold a whole copy of the teacher. "
                "Shard it with FSDP (accelerate config), capture its logits once (teacher_cache), "
                "or accept the copies: train.teacher_sharding: replicate")
        if sharding == "fsdp":
            if not fsdp:
                raise ValueError("train.teacher_sharding is 'fsdp' but this run is not launched with FSDP")
            return accelerator.prepare_model(teacher, evaluation_mode=True)
    return teacher.to(accelerator.device) if place else teacher


def _check_backend(accelerator: Accelerator, cfg: TrainConfig, objective: Objective,
                   checkpoint_dir: str | Path | None, resume: bool) -> None:
    """Refuse, before any step, what a distributed backend cannot do with this loop."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        if cfg.grad_accum_steps != 1:
            raise ValueError("under DeepSpeed, keep train.grad_accum_steps: 1 (the engine accumulates; "
                             "set gradient_accumulation_steps in the DeepSpeed config)")
        if getattr(objective, "trainable", []):
            raise ValueError("the objective's own modules (e.g. feature_kd's projections) would train "
                             "outside the DeepSpeed engine: use DDP or FSDP")
    if kind == DistributedType.FSDP and (resume or cfg.checkpoint.every):
        raise ValueError("checkpoints/--resume are supported for single-process and DDP runs; under FSDP "
                         "set train.checkpoint.every: null (the final model is still saved)")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _resume(checkpoint_dir: Path, run_config: dict | None, **parts: Any) -> dict:
    """Load the newest checkpoint; refuse one written by a run with another config."""
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        if PartialState().is_main_process:
            print(f"--resume: no checkpoint in {checkpoint_dir}, starting from step 1", flush=True)
        return {"step": 0, "tokens": 0}
    meta = load_checkpoint(path, **parts)
    if run_config is not None and meta.get("run_config") is not None:
        diff = [k for k in config_differences(meta["run_config"], run_config)
                if not k.startswith(RESUMABLE_CHANGES)]
        if diff:
            raise CheckpointError(
                f"{path} was written by a run with a different config ({', '.join(diff[:5])} differ): "
                "resume with the same config, or start fresh without --resume")
    return meta


def train_loop(
    model: nn.Module,
    objective: Objective,
    dataset: torch.utils.data.Dataset,
    collate: Any,
    cfg: TrainConfig,
    teacher: nn.Module | None = None,
    log_path: str | Path | None = None,
    show_progress: bool = True,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    run_config: dict | None = None,
    place_teacher: bool = True,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps; returns the loss history.

    ``checkpoint_dir``: where checkpoints go (every ``cfg.checkpoint.every`` steps and at the
    end); with ``resume`` the newest one there is loaded first and training continues after
    its step. ``run_config`` (the job's config as JSON) is stored in checkpoints to refuse
    resuming another run. ``place_teacher``: move the teacher to the student's device
    (False when the teacher was put on a device of its own).
    """
    set_seed(cfg.seed)
    log_dir = Path(log_path).parent if log_path else None
    process_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision=cfg.mixed_precision, log_with=cfg.trackers or None,
                              project_dir=str(log_dir / "trackers") if log_dir and cfg.trackers else None)
    world, rank = accelerator.num_processes, accelerator.process_index
    check_split(cfg.batch_size, world, cfg.grad_accum_steps)
    _check_backend(accelerator, cfg, objective, checkpoint_dir, resume)
    extra = [m.to(accelerator.device) for m in getattr(objective, "trainable", [])]
    optimizer = _optimizer(model, extra, cfg)
    # stepped once per optimizer step by us (accelerate's wrapper would step it per process)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, cfg.warmup_steps, cfg.steps, min_lr_rate=cfg.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher = _place_teacher(teacher, accelerator, cfg, place_teacher)
    parts = {"model": unwrap(model), "optimizer": optimizer, "scheduler": scheduler,
             "objective": objective, "rank": rank, "world_size": world}
    state = {"step": 0, "tokens": 0}
    if resume and checkpoint_dir is not None:
        state = _resume(Path(checkpoint_dir), run_config, **parts)
    start_step, tokens_total = state["step"], state["tokens"]
    # a resume from the last step runs no step: its final loss is the checkpoint's
    loss_value: float | None = state.get("loss")

    logger = TrainLogger(cfg, accelerator, log_path, show_progress, start_step)
    model.train()
    with logger:
        for step in range(start_step + 1, cfg.steps + 1):
            loss_value, n_tokens, metrics = _step(step, model, objective, teacher, dataset, collate,
                                                  cfg, accelerator, optimizer, scheduler, extra)
            tokens_total += n_tokens
            logger.step(step, loss_value, n_tokens, scheduler.get_last_lr()[0], metrics)
            every = cfg.checkpoint.every
            resumable = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                         DistributedType.MULTI_GPU)
            if resumable and checkpoint_dir is not None and ((every and step % every == 0) or step == cfg.steps):
                save_checkpoint(checkpoint_dir, step, **parts, barrier=accelerator.wait_for_everyone,
                                keep_last=cfg.checkpoint.keep_last,
                                state={"tokens": tokens_total, "run_config": run_config,
                                       "loss": loss_value})
    accelerator.wait_for_everyone()
    # sharded weights are gathered by every process together, then saved by the main one
    full = accelerator.get_state_dict(model) if accelerator.distributed_type == DistributedType.FSDP else None
    for tracker in accelerator.trackers:  # not end_training(): it would end the process group
        tracker.finish()
    return TrainResult(steps=cfg.steps, seconds=logger.seconds, tokens=tokens_total,
                       final_loss=loss_value, history=logger.history, resumed_from=start_step,
                       state_dict=full)


def _step(step: int, model: nn.Module, objective: Objective, teacher: nn.Module | None,
          dataset: torch.utils.data.Dataset, collate: Any, cfg: TrainConfig, accelerator: Accelerator,
          optimizer: torch.optim.Optimizer, scheduler: Any, extra: list[nn.Module],
          ) -> tuple[float, int, dict[str, float]]:
    """One optimizer step over the global batch of ``step``; returns (mean loss, tokens, metrics)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    # DeepSpeed keeps gradients in its own partitioned buffers: no count weighting there, each
    # micro-batch's mean is averaged by the engine (see _check_backend)
    weighted = accelerator.distributed_type != DistributedType.DEEPSPEED
    indices = global_batch(len(dataset), cfg.batch_size, cfg.seed, step - 1)
    shares = micro_batches(indices, rank, world, cfg.grad_accum_steps)
    local = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss·count, count, tokens
    metric_sums: dict[str, tuple[float, float]] = {}
    for j, idx in enumerate(shares):
        batch = _to_device(collate([dataset[i] for i in idx]), accelerator.device)
        # gradients are all-reduced once, on the last micro-batch
        sync = contextlib.nullcontext() if j == len(shares) - 1 else accelerator.no_sync(model)
        with sync:
            out = objective.loss(batch, model, teacher)
            if not isinstance(out, LossOutput):
                raise TypeError(f"{type(objective).__name__}.loss returned {type(out).__name__}, not a "
                                "LossOutput(loss, count, metrics)")
            loss, count, metrics = out.loss, float(out.count), out.metrics
            accelerator.backward(loss * count if weighted else loss)
        local += torch.tensor([loss.item() * count, count, float(batch["attention_mask"].sum())],
                              dtype=torch.float64, device=accelerator.device)
        for k, v in metrics.items():  # a metric is averaged over the micro-batches that report it
            total_v, total_c = metric_sums.get(k, (0.0, 0.0))
            metric_sums[k] = (total_v + float(v) * count, total_c + count)
    total = accelerator.reduce(local, reduction="sum") if world > 1 else local
    loss_sum, count, tokens = total.tolist()
    if weighted:
        _scale_gradients(model, extra, world / max(count, 1e-12), world, accelerator)
    if cfg.grad_clip:
        accelerator.clip_grad_norm_([p for m in [model, *extra] for p in m.parameters()], cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # the loop logs the loss and the tokens itself
    metrics = {k: v / max(c, 1e-12) for k, (v, c) in metric_sums.items() if k not in ("loss", "tokens")}
    return loss_sum / max(count, 1e-12), int(tokens), metrics


def _scale_gradients(model: nn.Module, extra: list[nn.Module], factor: float, world: int,
                     accelerator: Accelerator) -> None:
    """Turn summed ``loss × count`` gradients into the global-batch mean.

    The student's gradients arrive averaged over processes (DDP), hence ``factor`` =
    processes / global count; the objective's own modules are not DDP-wrapped, so their
    gradients are summed over processes here and divided by the global count.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
        for m in extra:
            for p in m.parameters():
                if p.grad is None:
                    continue
                if world > 1:
                    p.grad.copy_(accelerator.reduce(p.grad, reduction="sum"))
                p.grad.mul_(factor / world)
