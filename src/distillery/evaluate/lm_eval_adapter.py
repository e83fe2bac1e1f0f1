"""lm-evaluation-harness on a distillery model, in process and offline (optional extra).

:func:`run_lm_eval` loads a model directory (a run's teacher or a student) with distillery's
own loaders, wraps it in lm-eval's ``HFLM`` (the tokenizer passed in, so lm-eval never looks a
tokenizer up on the hub), finds tasks with a ``TaskManager`` that also reads the user's task
YAMLs, and runs ``lm_eval.simple_evaluate``. Every metric comes back with a 95% interval,
in the shape ``metrics.json`` keeps per model::

    {"lm_eval": {task: {metric: {"value", "stderr", "ci95": [lo, hi] | None, "n"}}}}

so ``metrics["models"][name].update(run_lm_eval(...))`` merges it, and
:func:`format_lm_eval` writes the report.md table.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distillery.config import ConfigError
from distillery.errors import MissingExtraError, MissingInputError
from distillery.models import load_model, load_tokenizer

__all__ = ["format_lm_eval", "lm_eval_metrics", "run_lm_eval"]

INSTALL_HINT = "pip install 'distillery[lm_eval]'"
Z95 = 1.959963984540054
# metrics that are shares of items: their interval is clipped to [0, 1]
_PROPORTIONS = {"acc", "acc_norm", "acc_mutual_info", "exact_match", "mc1", "mc2"}


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as exc:
        raise MissingExtraError(
            f"the lm-evaluation-harness adapter needs the lm_eval package ({exc}): {INSTALL_HINT}"
        ) from None
    return lm_eval


def _go_offline() -> None:
    """Nothing downloads: the hub and datasets offline switches, before lm-eval (and so
    ``datasets``) is imported. ``datasets`` reads its switch once at import, so where it is
    already imported its config is set too. Hub task datasets then load only from the cache."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "datasets" in sys.modules:
        import datasets

        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True


def _task_manager(tasks: Sequence[str], include_path: str | None) -> Any:
    """A TaskManager that knows ``tasks``. lm-eval's own task YAMLs (thousands; indexing them
    took 13 s here) are read only when the local ``include_path`` does not hold every task."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise MissingInputError(f"lm_eval include_path is not a directory: {include_path}")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or in {include_path}" if include_path else " (give include_path for local task YAMLs)"
        raise ConfigError(f"unknown lm-eval task(s) {unknown}: not among lm-eval's tasks{where}")
    return manager


def run_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str],
    include_path: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    bootstrap_iters: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """Run lm-eval ``tasks`` on the model in ``model_dir``; metrics with 95% intervals.

    ``include_path``: a directory of task YAMLs (e.g. ``dataset_path: json`` with local
    ``data_files``); ``limit``: items per task (a fraction when < 1); ``device``: 'auto', 'cpu',
    'cuda:0', ...; ``bootstrap_iters``: lm-eval's resamples for the stderr of metrics that are
    not plain means (means use the sample formula). Offline: see :func:`_go_offline`.
    Returns ``{"lm_eval": {task: {metric: {"value", "stderr", "ci95", "n"}}}}``.
    """
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    _go_offline()
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = _task_manager(tasks, include_path)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), device=device, dtype=dtype).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    return {"lm_eval": lm_eval_metrics(results)}


def lm_eval_metrics(results: Mapping[str, Any]) -> dict[str, dict]:
    """``simple_evaluate``'s results as ``{task: {metric: {"value", "stderr", "ci95", "n"}}}``.

    lm-eval keys a metric as ``"acc,none"`` (metric, filter) with its standard error under
    ``"acc_stderr,none"``; the filter is kept in the name unless it is "none"
    (``"exact_match/strict-match"``). ``ci95`` is ``value ± 1.96 stderr`` (clipped to [0, 1]
    for accuracies), None when lm-eval gives no stderr.
    """
    samples = results.get("n-samples", {})
    out: dict[str, dict] = {}
    for task, row in results["results"].items():
        metrics: dict[str, dict] = {}
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            stderr = row.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
            name = metric if filt == "none" else f"{metric}/{filt}"
            metrics[name] = {"value": float(value), "stderr": stderr, "ci95": _ci95(metric, float(value), stderr),
                             "n": samples.get(task, {}).get("effective", row.get("sample_len"))}
        out[task] = metrics
    return out


def _ci95(metric: str, value: float, stderr: float | None) -> list[float] | None:
    if stderr is None:
        return None
    lo, hi = value - Z95 * stderr, value + Z95 * stderr
    if metric in _PROPORTIONS:
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return [lo, hi]


def format_lm_eval(models: Mapping[str, Mapping[str, Any]]) -> str:
    """The report.md table: one row per model, task and metric, value with its 95% CI.

    ``models``: ``{name: run_lm_eval(...)}`` (or metrics.json's ``models``: entries without
    an ``lm_eval`` key are skipped). Empty string when no model has lm-eval results.
    """
    rows = []
    for name, m in models.items():
        for task, metrics in (m.get("lm_eval") or {}).items():
            for metric, r in metrics.items():
                ci = f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r.get("ci95") else "n/a"
                rows.append(f"| {name} | {task} | {metric} | {r['value']:.3f} | {ci} | {r.get('n') or ''} |")
    if not rows:
        return ""
    head = ["## lm-evaluation-harness", "", "| model | task | metric | value | 95% CI | n |",
            "|---|---|---|---:|---|---:|"]
    return "\n".join(head + rows) + "\n"
