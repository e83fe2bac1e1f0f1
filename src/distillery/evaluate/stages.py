"""The evaluation stages shared by ``distillery run`` and ``distillery eval``, each resumable.

A stage records a fingerprint of what it depends on in ``<run_dir>/stages/<stage>.json`` once
it has finished (:class:`Stage`); a re-run skips it when its outputs exist under the same
fingerprint. Stages, in order:

1. :func:`evaluate_all`: greedy answers of every model on the same held-out problems
   (``eval/<name>.json``), accuracy with its CI; speed measured again on every run;
2. :func:`judge_all`: the LLM judge (``eval.judge``), pairwise against the reference model and/or
   pointwise, its calls cached in ``eval/judge/`` (a killed run resumes; a re-run pays nothing);
3. :func:`lm_eval_all`: lm-evaluation-harness tasks (``eval.lm_eval``) per model;
4. :func:`write_eval_report`: ``metrics.json`` (comparisons, ``judge``, per-model ``lm_eval``)
   and the report through :func:`~distillery.evaluate.report.build_report`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console

from distillery.config import EvalConfig, TaskConfig, config_hash
from distillery.evaluate.grading import judge_teacher, task_grader
from distillery.evaluate.report import NOTES_FILE, build_report, write_metrics
from distillery.evaluate.run import evaluate_model, probe_speed
from distillery.evaluate.stats import bootstrap_ratio, paired_bootstrap_diff
from distillery.outputs import claim_dir
from distillery.records import write_json_atomic
from distillery.tasks import load_problems
from distillery.teachers import HFTeacher, SamplingParams

console = Console(stderr=True)

# EvalConfig keys that do not change the greedy answers: left out of the accuracy fingerprint,
# so that adding a judge or lm-eval task to a finished run does not re-evaluate every model
_NOT_ACCURACY = {"judge", "lm_eval", "pitfalls"}


class Stage:
    """A finished-stage marker: ``done(fp)`` is true when the stage ran to the end under ``fp``."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.name = name
        self.marker = run_dir / "stages" / f"{name}.json"

    def done(self, fingerprint: str, *outputs: Path) -> bool:
        if not self.marker.is_file() or not all(p.exists() for p in outputs):
            return False
        return json.loads(self.marker.read_text()).get("fingerprint") == fingerprint

    def finish(self, fingerprint: str, **info: object) -> None:
        write_json_atomic(self.marker, {"fingerprint": fingerprint, "finished": time.time(), **info})


def accuracy_fingerprint(task: TaskConfig, cfg: EvalConfig, model_fp: str) -> str:
    """What a model's held-out answers depend on: the task, the decoding settings, the model."""
    return config_hash(task, cfg.model_dump(mode="json", exclude=_NOT_ACCURACY), model_fp)


def dir_fingerprint(path: str | Path) -> str:
    """A model directory's identity without reading its weights: each file's name, size, mtime."""
    root = Path(path).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return config_hash(str(root), [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def evaluate_all(
    task: TaskConfig, cfg: EvalConfig, run_dir: Path, models: Mapping[str, tuple[Path, str]], device: str = "auto",
) -> dict[str, dict]:
    """Accuracy of every model (``name → (dir, fingerprint)``) on the same held-out problems.

    Results land in ``eval/<name>.json`` (every output); speed is re-measured every run.
    """
    problems = load_problems(task, "eval", cfg.num_problems, seed=cfg.seed)
    results: dict[str, dict] = {}
    judges: list = []  # the judge grader's model, built once and only when a model is graded
    for name, (model_dir, model_fp) in models.items():
        path = run_dir / "eval" / f"{name}.json"
        fp = accuracy_fingerprint(task, cfg, model_fp)
        stage = Stage(run_dir, f"eval_{name}")
        teacher = HFTeacher.from_pretrained(model_dir, batch_size=cfg.batch_size, device=device)
        if stage.done(fp, path):
            res = json.loads(path.read_text())
            # accuracy is reused; speed is measured again so all models' figures share a run
            res.update(probe_speed(teacher, problems, cfg))
        else:
            console.rule(f"evaluate {name} on {len(problems)} held-out problems")
            if not judges:
                judges.append(judge_teacher(task.grader, cfg.judge.model if cfg.judge else None))
            grader = task_grader(task.grader, judge=judges[0], model=teacher, problems=problems)
            res = evaluate_model(teacher, problems, cfg, grader=grader)
            write_json_atomic(path, res)
            stage.finish(fp)
        results[name] = res
        console.print(
            f"{name}: accuracy {res['accuracy']:.3f} [{res['ci95'][0]:.3f}, {res['ci95'][1]:.3f}], "
            f"{res['tokens_per_s']:.0f} tok/s at batch 1"
        )
    for judge in judges:
        getattr(judge, "close", lambda: None)()
    return results


# --------------------------------------------------------------------------- comparisons


def _flags(result: dict) -> list[float]:
    """Per item its score: 0/1, the mean over ``eval.samples`` answers, or token F1."""
    return [float(i.get("score", i["correct"])) for i in result["items"]]


def compare_models(
    results: Mapping[str, dict], reference: str, cfg: EvalConfig, baseline: str | None = None,
) -> dict[str, dict]:
    """Paired bootstrap differences (``"<a> - <b>"``) and retention ratios (``"<a> / <ref>"``).

    Every model against ``reference`` (difference, and ratio when the reference scored > 0);
    every other model against ``baseline`` too when given (e.g. the ground-truth student).
    """
    out: dict[str, dict] = {}
    others = [n for n in results if n != reference]
    if baseline is not None:
        for n in others:
            if n != baseline:
                diff, lo, hi = paired_bootstrap_diff(_flags(results[n]), _flags(results[baseline]),
                                                     cfg.bootstrap_resamples, seed=cfg.seed)
                out[f"{n} - {baseline}"] = {"accuracy_diff": diff, "ci95": [lo, hi]}
    ref = _flags(results[reference])
    for n in others:
        a = _flags(results[n])
        diff, lo, hi = paired_bootstrap_diff(a, ref, cfg.bootstrap_resamples, seed=cfg.seed)
        out[f"{n} - {reference}"] = {"accuracy_diff": diff, "ci95": [lo, hi]}
        if sum(ref) > 0:
            keep, klo, khi = bootstrap_ratio(a, ref, cfg.bootstrap_resamples, seed=cfg.seed)
            out[f"{n} / {reference}"] = {"accuracy_ratio": keep, "ci95": [klo, khi]}
    return out


# --------------------------------------------------------------------------- the judge


def _outputs_fp(results: Mapping[str, dict], n: int) -> dict[str, str]:
    """Per model, a hash of the first ``n`` items it would be judged on (id, prompt, output)."""
    return {name: hashlib.sha256(json.dumps([[i["id"], i["prompt"], i["output"], i["reference"]]
                                             for i in r["items"][:n]]).encode()).hexdigest()[:16]
            for name, r in results.items()}


def _reset_phases(out_dir: Path, fingerprint: str) -> None:
    """Judge phase files written under another fingerprint are stale (other answers, other
    settings): removed, because a finished phase is never run again. The response cache stays,
    so calls whose prompt did not change are still free."""
    mark = out_dir / "fingerprint.json"
    if mark.is_file() and json.loads(mark.read_text()).get("fingerprint") == fingerprint:
        return  # the same judging, interrupted: its partial files resume
    for path in out_dir.glob("*.jsonl*"):
        path.unlink()
    write_json_atomic(mark, {"fingerprint": fingerprint})


def judge_all(
    cfg: EvalConfig, run_dir: Path, results: Mapping[str, dict], reference: str,
) -> dict[str, dict]:
    """``eval.judge`` over the first ``max_items`` held-out answers: ``{"judge": ..., "judge_pointwise": ...}``.

    ``judge``: per ``"<model> vs <reference>"`` the :func:`~distillery.evaluate.judge.pairwise_summary`
    (win rate of the model, ties ½, both orders; length-controlled rate; position-bias rate);
    ``judge_pointwise``: per model the :func:`~distillery.evaluate.judge.grade_summary`. Empty
    without ``eval.judge``. Calls and verdicts live in ``eval/judge/``.
    """
    from distillery.evaluate.judge import (
        compare_pairwise,
        grade_pointwise,
        grade_summary,
        pairwise_summary,
    )
    from distillery.teachers import build_teacher
    from distillery.teachers.phases import ResponseCache

    jc = cfg.judge
    if jc is None:
        return {}
    out_dir = run_dir / "eval" / "judge"
    summary_path = out_dir / "summary.json"
    fp = config_hash(jc, reference, cfg.bootstrap_resamples, cfg.seed, _outputs_fp(results, jc.max_items))
    stage = Stage(run_dir, "judge")
    if stage.done(fp, summary_path):
        return json.loads(summary_path.read_text())
    # marked: a stale judging's phase files in it are deleted, so it must be ours
    claim_dir(out_dir, "distillery eval (judge)", "move it away, or choose another run_dir")
    _reset_phases(out_dir, fp)
    items = {name: r["items"][: jc.max_items] for name, r in results.items()}
    params = SamplingParams(max_new_tokens=jc.max_new_tokens, temperature=0.0, seed=cfg.seed)
    judge, cache = build_teacher(jc.model), ResponseCache(out_dir / "cache.sqlite")
    summary: dict[str, dict] = {}
    try:
        if jc.pairwise:
            console.rule(f"judge: pairwise against {reference} ({jc.model.model})")
            summary["judge"] = {}
            for name in (n for n in results if n != reference):
                comps = compare_pairwise(judge, items[name], items[reference], out_dir, template=jc.pairwise_template,
                                         params=params, cache=cache, name=f"pairwise_{name}_vs_{reference}")
                summary["judge"][f"{name} vs {reference}"] = pairwise_summary(
                    comps, [len(i["output"]) for i in items[name]], [len(i["output"]) for i in items[reference]],
                    cfg.bootstrap_resamples, cfg.seed)
        if jc.pointwise:
            console.rule(f"judge: pointwise grades ({jc.model.model})")
            summary["judge_pointwise"] = {
                name: grade_summary(grade_pointwise(judge, items[name], out_dir, template=jc.pointwise_template,
                                                    params=params, cache=cache, name=f"pointwise_{name}"),
                                    cfg.bootstrap_resamples, cfg.seed)
                for name in results}
    finally:
        cache.close()
        getattr(judge, "close", lambda: None)()
    write_json_atomic(summary_path, summary)
    stage.finish(fp)
    return summary


# --------------------------------------------------------------------------- lm-eval


def lm_eval_all(cfg: EvalConfig, run_dir: Path, models: Mapping[str, tuple[Path, str]]) -> dict[str, dict]:
    """``eval.lm_eval`` tasks per model: ``{name: {task: {metric: {value, stderr, ci95, n}}}}``
    (``eval/lm_eval/<name>.json``); empty without ``eval.lm_eval``."""
    lc = cfg.lm_eval
    if lc is None:
        return {}
    from distillery.evaluate.lm_eval_adapter import run_lm_eval

    out = {}
    for name, (model_dir, model_fp) in models.items():
        path = run_dir / "eval" / "lm_eval" / f"{name}.json"
        fp = config_hash(lc, cfg.seed, model_fp)
        stage = Stage(run_dir, f"lm_eval_{name}")
        if not stage.done(fp, path):
            console.rule(f"lm-eval {', '.join(lc.tasks)} on {name}")
            limit = int(lc.limit) if lc.limit is not None and lc.limit >= 1 else lc.limit
            res = run_lm_eval(model_dir, lc.tasks, include_path=lc.include_path, limit=limit,
                              num_fewshot=lc.num_fewshot, batch_size=lc.batch_size, device=lc.device,
                              seed=cfg.seed)
            write_json_atomic(path, res["lm_eval"])
            stage.finish(fp)
        out[name] = json.loads(path.read_text())
    return out


# --------------------------------------------------------------------------- metrics.json and the report


def write_eval_report(
    run_dir: Path, cfg: EvalConfig, results: dict[str, dict], *, task: str, reference: str,
    comparisons: dict, judged: dict, lm_eval: dict, header: str | None = None, notes: list[str] | None = None,
    train_data: list[str] | None = None, model_dirs: dict[str, str] | None = None,
) -> dict:
    """metrics.json (models with their ``lm_eval``, ``comparisons``, ``judge``...), the notes, and
    the report (:func:`build_report`: scorecard, pitfalls, plots, report.md, report.html)."""
    for name, res in lm_eval.items():
        results[name]["lm_eval"] = res
    extra = {"reference": reference, "comparisons": comparisons, **judged}
    if train_data is not None:
        extra["train_data"] = train_data  # what the contamination check reads on `distillery report`
    if model_dirs is not None:
        extra["model_dirs"] = model_dirs  # where `distillery report` finds each model's train_log.jsonl
    write_metrics(run_dir / "metrics.json", results, task=task, n_eval=cfg.num_problems, extra=extra)
    notes_path = run_dir / NOTES_FILE
    if notes:
        notes_path.write_text("\n\n".join(notes) + "\n")
    else:
        notes_path.unlink(missing_ok=True)
    return build_report(run_dir, header, cfg.bootstrap_resamples, cfg.seed, thresholds=cfg.pitfalls)


def task_name(task: TaskConfig) -> str:
    """The task as metrics.json names it."""
    if task.name == "jsonl":
        return f"jsonl:{task.path}"
    return (f"arithmetic(operands={task.num_operands}, digits={task.digits}, ops={''.join(task.operations)}, "
            f"style={task.style})")
