"""``distillery grade OUTPUTS.jsonl --task TASK.yaml``: score outputs made elsewhere (by vLLM, an
API, another harness) against a task's references, with the task's grader.

Each line of OUTPUTS is ``{"id": ..., "output": ...}`` or ``{"prompt": ..., "output": ...}``; it is
matched to a task item by ``id``, else by ``prompt``. The items are what ``eval`` grades: for a
JSONL task every record of ``task.path`` and ``task.eval_path``; for the arithmetic task the
held-out problems ``eval`` would draw (``eval.num_problems`` at ``eval.seed`` of TASK.yaml).
Per-item results go to ``<OUTPUTS stem>.graded.jsonl`` beside OUTPUTS.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from distillery.config import EvalConfig, TaskConfig, load_config
from distillery.errors import DistilleryError
from distillery.evaluate.grading import judge_teacher, task_grader
from distillery.evaluate.stats import bootstrap_ci
from distillery.records import iter_jsonl, write_jsonl_atomic
from distillery.tasks import Problem, load_problems, task_items
from distillery.tasks.jsonl import read_task_file

__all__ = ["GradeFile", "GradeInputError", "grade_outputs", "graded_path"]


class GradeInputError(DistilleryError, ValueError):
    """An outputs file that cannot be graded; the message names the file and line."""


class GradeFile(BaseModel):
    """TASK.yaml: its ``task:`` section (the same schema as ``run``'s) and, optionally, ``eval:``
    (held-out problems of a generated task, bootstrap settings, the judge). Other top-level keys
    are ignored, so a whole run config can serve as TASK.yaml."""

    model_config = ConfigDict(extra="ignore")
    task: TaskConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)


def graded_path(outputs: Path) -> Path:
    """``runs/x/outputs.jsonl`` → ``runs/x/outputs.graded.jsonl``."""
    return outputs.with_name(outputs.name.removesuffix(".jsonl") + ".graded.jsonl")


def _task_pool(task: TaskConfig, cfg: EvalConfig) -> list[Problem]:
    if task.name == "jsonl":
        pool = read_task_file(task.path)  # type: ignore[arg-type]  # jsonl requires path
        if task.eval_path:
            pool += read_task_file(task.eval_path)
        return pool
    return load_problems(task, "eval", cfg.num_problems, seed=cfg.seed)


def _match(path: Path, task: TaskConfig, pool: list[Problem]) -> tuple[list[Problem], list[str | None]]:
    """The task item and the output of every line of ``path``, in order."""
    by_id = {p.id: p for p in pool}
    by_prompt = {p.prompt: p for p in pool}
    problems, outputs = [], []
    if not path.is_file():
        raise GradeInputError(f"outputs file not found: {path}")
    for lineno, rec in iter_jsonl(path, GradeInputError):
        where = f"{path}:{lineno}"
        if "output" not in rec or not (rec["output"] is None or isinstance(rec["output"], str)):
            raise GradeInputError(f'{where}: needs "output", the model\'s text (a string, or null for none)')
        if rec.get("id") is not None and str(rec["id"]) in by_id:
            problem = by_id[str(rec["id"])]
        elif isinstance(rec.get("prompt"), str) and rec["prompt"] in by_prompt:
            problem = by_prompt[rec["prompt"]]
        elif rec.get("id") is None and not isinstance(rec.get("prompt"), str):
            raise GradeInputError(f'{where}: needs "id" or "prompt" to find its task item')
        else:
            key = f"id {rec['id']!r}" if rec.get("id") is not None else f"prompt {rec['prompt'][:60]!r}"
            source = task.path if task.name == "jsonl" else f"the task's {len(pool)} held-out problems"
            raise GradeInputError(f"{where}: no task item has {key} (looked in {source}); check that "
                                  "the outputs belong to this task")
        problems.append(problem)
        outputs.append(rec["output"])
    if not problems:
        raise GradeInputError(f"{path}: no outputs (the file is empty)")
    return problems, outputs


def grade_outputs(outputs_path: str | Path, task_path: str | Path) -> dict:
    """Grade every line of ``outputs_path`` with the grader of ``task_path``'s task; write the
    per-item results beside it. Returns ``{"accuracy", "ci95", "n", "no_answer", "grader",
    "graded"}`` (accuracy is the mean score, with its bootstrap 95% CI over items)."""
    cfg = load_config(task_path, GradeFile)
    path = Path(outputs_path)
    problems, outputs = _match(path, cfg.task, _task_pool(cfg.task, cfg.eval))
    judge = judge_teacher(cfg.task.grader, cfg.eval.judge.model if cfg.eval.judge else None)
    grader = task_grader(cfg.task.grader, judge=judge)
    try:
        verdicts = grader.grade_all(task_items(problems, outputs))
    finally:
        getattr(judge, "close", lambda: None)()
    scores = [v.score for v in verdicts]
    acc, lo, hi = bootstrap_ci(scores, cfg.eval.bootstrap_resamples, seed=cfg.eval.seed)
    out = graded_path(path)
    write_jsonl_atomic(out, ({"id": p.id, "prompt": p.prompt, "reference": p.reference, "output": o,
                              **v.to_dict()}
                             for p, o, v in zip(problems, outputs, verdicts)))
    return {"accuracy": acc, "ci95": [lo, hi], "n": len(verdicts),
            "no_answer": sum(v.status == "no_answer" for v in verdicts), "grader": grader.name,
            "graded": str(out)}
