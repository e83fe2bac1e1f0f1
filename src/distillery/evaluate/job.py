"""``distillery eval CONFIG``: evaluate existing model directories, no training.

The same stages and files as the evaluation end of ``distillery run`` (see
:mod:`distillery.evaluate.stages`): ``eval/<name>.json``, the judge in ``eval/judge/``,
``metrics.json``, ``report.md``, ``report.html`` and the plots in ``output_dir``; resumable
(a re-run only measures speed again, unless a model directory or a setting changed).
"""

from __future__ import annotations

import time
from pathlib import Path

from distillery.config import EvalJobConfig, dump_config
from distillery.errors import MissingInputError
from distillery.evaluate.stages import (
    compare_models,
    console,
    dir_fingerprint,
    evaluate_all,
    judge_all,
    lm_eval_all,
    task_name,
    write_eval_report,
)


def _model_dirs(cfg: EvalJobConfig) -> dict[str, tuple[Path, str]]:
    """``name → (dir, fingerprint)``, the reference first (it leads every table)."""
    missing = {n: d for n, d in cfg.models.items() if not (Path(d) / "config.json").is_file()}
    if missing:
        name, d = next(iter(missing.items()))
        raise MissingInputError(f"models.{name}: {d} is not a Hugging Face model directory (no config.json)")
    ref = cfg.reference_name
    order = [ref] + [n for n in cfg.models if n != ref]
    return {n: (Path(cfg.models[n]), dir_fingerprint(cfg.models[n])) for n in order}


def run_eval_job(cfg: EvalJobConfig) -> dict:
    """Evaluate every model of ``cfg.models`` into ``cfg.output_dir``; returns metrics.json's content."""
    for path in cfg.train_paths:
        if not Path(path).is_file():
            raise MissingInputError(f"train_data: {path} not found (JSONL records for the contamination check)")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    start = time.perf_counter()
    models = _model_dirs(cfg)
    ref = cfg.reference_name
    results = evaluate_all(cfg.task, cfg.eval, out, models, device=cfg.device)
    judged = judge_all(cfg.eval, out, results, ref)
    lm = lm_eval_all(cfg.eval, out, models)
    header = (f"# distillery eval: {out}\n\nTask: `{task_name(cfg.task)}`, {cfg.eval.num_problems} held-out "
              f"problems, greedy decoding; reference model: {ref}.")
    notes = ["## Models\n\n" + "\n".join(f"- **{n}**: `{d}`" for n, (d, _) in models.items())]
    metrics = write_eval_report(
        out, cfg.eval, results, task=task_name(cfg.task), reference=ref,
        comparisons=compare_models(results, ref, cfg.eval), judged=judged, lm_eval=lm, header=header,
        notes=notes, train_data=cfg.train_paths or None, model_dirs={n: str(d) for n, (d, _) in models.items()},
    )
    console.print(f"done in {time.perf_counter() - start:.0f}s: {out / 'report.md'}")
    return metrics
