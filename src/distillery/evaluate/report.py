"""The run report: metrics.json (stable shape), report.md, and PNG plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from distillery.records import write_json_atomic  # noqa: E402

MODEL_KEYS = ("accuracy", "ci95", "tokens_per_s", "params")


def write_metrics(path: Path, models: dict[str, dict], task: str, n_eval: int, extra: dict) -> dict:
    """``{"models": {name: {accuracy, ci95, tokens_per_s, params, ...}}, "task", "n_eval", ...}``."""
    metrics = {
        "models": {name: {k: v for k, v in m.items() if k != "items"} for name, m in models.items()},
        "task": task,
        "n_eval": n_eval,
        **extra,
    }
    write_json_atomic(path, metrics)
    return metrics


def plot_accuracy(models: dict[str, dict], path: Path) -> None:
    """Bar chart of accuracy per model with its 95% CI as error bars."""
    names = list(models)
    acc = [100 * models[n]["accuracy"] for n in names]
    err = [
        [100 * (models[n]["accuracy"] - models[n]["ci95"][0]) for n in names],
        [100 * (models[n]["ci95"][1] - models[n]["accuracy"]) for n in names],
    ]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    bars = ax.bar(names, acc, yerr=err, capsize=6, color=["#4c72b0", "#dd8452", "#55a868", "#8172b3"][: len(names)])
    for bar, a in zip(bars, acc):
        ax.text(bar.get_x() + bar.get_width() / 2, 1, f"{a:.1f}%", ha="center", va="bottom", color="white")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy with bootstrap 95% CI")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_losses(histories: dict[str, list[dict]], path: Path) -> None:
    """Training loss per step for each trained model."""
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name, hist in histories.items():
        if hist:
            ax.plot([h["step"] for h in hist], [h.get("ce", h["loss"]) for h in hist], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy on assistant tokens")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_report_md(path: Path, metrics: dict, sections: list[str]) -> None:
    """report.md: the scorecard table first, then the sections the pipeline supplies."""
    rows = [
        "| model | params | accuracy | 95% CI | no answer | tokens/s (batch 1) | tokens/s (batched) |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, m in metrics["models"].items():
        rows.append(
            f"| {name} | {m['params']:,} | {_pct(m['accuracy'])} | [{_pct(m['ci95'][0])}, {_pct(m['ci95'][1])}] "
            f"| {m.get('no_answer', 0)} / {m.get('n', metrics['n_eval'])} | {m['tokens_per_s']:,.0f} "
            f"| {m.get('tokens_per_s_batched', 0):,.0f} |"
        )
    text = "\n".join(sections[:1] + ["", *rows, "", *sections[1:]]) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
