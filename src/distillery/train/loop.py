"""The training loop: one plain PyTorch loop on accelerate; objectives plug into it.

Read it top to bottom: seed, build the loader/optimizer/schedule, prepare them with
accelerate, then step: loss from the objective → backward → clip → optimizer → schedule.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from distillery.config import TrainConfig
from distillery.train.objectives import Objective


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    final_loss: float
    history: list[dict] = field(default_factory=list)


def _infinite(loader: torch.utils.data.DataLoader):
    """Batches forever, reshuffling each epoch (the sampler's generator advances)."""
    while True:
        yield from loader


def train_loop(
    model: nn.Module,
    objective: Objective,
    dataset: torch.utils.data.Dataset,
    collate: object,
    cfg: TrainConfig,
    teacher: nn.Module | None = None,
    log_path: str | Path | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps; returns the loss history."""
    set_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= cfg.batch_size,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    decay, no_decay = [], []
    # the student's parameters and any the objective trains beside it (e.g. feature projections)
    extra = [m.to(accelerator.device) for m in getattr(objective, "trainable", [])]
    for module in [model, *extra]:
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, cfg.warmup_steps, cfg.steps, min_lr_rate=cfg.min_lr_ratio
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if objective.needs_teacher:
        if teacher is None:
            raise ValueError("this objective needs a teacher, and none was given")
        # the teacher never trains: eval mode (no dropout), no grads, next to the student
        teacher = teacher.to(accelerator.device).eval().requires_grad_(False)

    log_file = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
    history: list[dict] = []
    model.train()
    batches = _infinite(loader)
    tokens_total, window_tokens, window_start, start = 0, 0, time.perf_counter(), time.perf_counter()
    loss_value = math.nan
    columns = (
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
    )
    show = show_progress and accelerator.is_main_process
    progress = Progress(*columns, disable=not show, transient=False)
    # a live bar needs a terminal; in logs (CI, `| tee`) print a plain line every 10% instead
    plain_every = max(cfg.steps // 10, 1) if show and not progress.console.is_terminal else 0
    with progress:
        bar = progress.add_task("train", total=cfg.steps, loss=math.nan, tps=0.0)
        for step in range(1, cfg.steps + 1):
            batch = next(batches)
            loss, metrics = objective.loss(batch, model, teacher)
            accelerator.backward(loss)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            n_tokens = int(batch["attention_mask"].sum())
            tokens_total += n_tokens
            window_tokens += n_tokens
            loss_value = loss.item()
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_tokens, window_start = 0, now
                entry = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                         "tokens_per_s": tps, **metrics}
                history.append(entry)
                if log_file:
                    log_file.write(json.dumps(entry) + "\n")
                    log_file.flush()
                progress.update(bar, loss=loss_value, tps=tps)
            progress.advance(bar)
            if plain_every and (step % plain_every == 0 or step == cfg.steps):
                progress.console.print(
                    f"step {step}/{cfg.steps} loss {loss_value:.4f} "
                    f"({time.perf_counter() - start:.0f}s elapsed)", highlight=False
                )
    if log_file:
        log_file.close()
    accelerator.wait_for_everyone()
    return TrainResult(
        steps=cfg.steps,
        seconds=time.perf_counter() - start,
        tokens=tokens_total,
        final_loss=loss_value,
        history=history,
    )
