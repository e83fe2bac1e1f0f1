"""What a training run reports: a progress bar, ``train_log.jsonl``, trackers, a loss-curve PNG.

Only the main process reports. ``train_log.jsonl`` gets a line every ``log_every`` steps and
at the last step; a resumed run first drops the lines of steps after its checkpoint (they
will be trained again), so the log reads as one uninterrupted run. Trackers are accelerate's
(``tensorboard``, ``wandb``: ``train.trackers``); the PNG (``loss_curve.png``, beside the
log) is drawn from the whole log when the run ends.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distillery.config import TrainConfig
from distillery.records import json_text


def _truncate_log(path: Path, after_step: int) -> None:
    """Keep only the lines of steps ≤ ``after_step`` (atomically: write, then rename)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= after_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn last line from a killed run
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    tmp.replace(path)


def plot_loss_curve(log_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss (and each ``kd/*``/``ce`` metric) against step, from a ``train_log.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="loss", linewidth=2)
    for key in sorted({k for r in rows for k in r if k == "ce" or k.startswith("kd/")}):
        ax.plot(steps, [r.get(key, math.nan) for r in rows], label=key, linewidth=1, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def _scalar_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config flattened to scalars (TensorBoard's hparams take nothing else)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, (int, float, str, bool)):
            out[prefix.rstrip(".")] = node

    walk(cfg.model_dump(mode="json"), "train.")
    return out


class TrainLogger:
    """Progress bar + JSONL + trackers for one run; use as a context manager around the steps."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, log_path: str | Path | None,
                 show_progress: bool, start_step: int) -> None:
        self.cfg, self.accelerator, self.start_step = cfg, accelerator, start_step
        self.main = accelerator.is_main_process
        self.log_path = Path(log_path) if log_path and self.main else None
        self.history: list[dict] = []
        columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                   TimeRemainingColumn())
        self.progress = Progress(*columns, disable=not (show_progress and self.main), transient=False)
        # a live bar needs a terminal; in logs (CI, `| tee`) print a plain line every 10% instead
        self.plain_every = (max(cfg.steps // 10, 1)
                            if show_progress and self.main and not self.progress.console.is_terminal else 0)

    def __enter__(self) -> TrainLogger:
        if self.log_path is not None:
            _truncate_log(self.log_path, self.start_step)
            self.file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        if self.cfg.trackers:
            self.accelerator.init_trackers("distillery", config=_scalar_config(self.cfg))
        self.progress.__enter__()
        self.bar = self.progress.add_task("train", total=self.cfg.steps, completed=self.start_step,
                                          loss=math.nan, tps=0.0)
        self.start = self.window_start = time.perf_counter()
        self.window_tokens = 0
        return self

    def step(self, step: int, loss: float, tokens: int, lr: float, metrics: dict[str, float]) -> None:
        self.window_tokens += tokens
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            now = time.perf_counter()
            tps = self.window_tokens / max(now - self.window_start, 1e-9)
            self.window_tokens, self.window_start = 0, now
            entry = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tps, **metrics}
            self.history.append(entry)
            if self.log_path is not None:
                self.file.write(json_text(entry, self.log_path) + "\n")
                self.file.flush()
            if self.cfg.trackers:
                self.accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=step)
            self.progress.update(self.bar, loss=loss, tps=tps)
        self.progress.advance(self.bar)
        if self.plain_every and (step % self.plain_every == 0 or step == self.cfg.steps):
            self.progress.console.print(
                f"step {step}/{self.cfg.steps} loss {loss:.4f} ({self.seconds:.0f}s elapsed)", highlight=False)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)
        if self.log_path is not None:
            self.file.close()
            if exc[0] is None:
                plot_loss_curve(self.log_path, self.log_path.with_name("loss_curve.png"))
