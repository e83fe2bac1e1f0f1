"""A user's own task: a JSONL file of ``{"prompt", "reference"}`` records (optional "id",
"chain"; any other key is kept in ``Problem.extra`` for the task's ``prompt_template``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from distillery.errors import DistilleryError
from distillery.records import iter_jsonl
from distillery.tasks.arithmetic import Problem, split_of


class TaskFileError(DistilleryError, ValueError):
    """A task file that cannot be read, with the file and line that are wrong."""


def read_task_file(path: str | Path) -> list[Problem]:
    """Every record of a task JSONL file, validated; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"task file not found: {path}")
    problems, ids = [], set()
    for lineno, rec in iter_jsonl(path, TaskFileError):
        if not isinstance(rec.get("prompt"), str):
            raise TaskFileError(f'{path}:{lineno}: each line needs a string "prompt"')
        if "reference" not in rec:
            raise TaskFileError(f'{path}:{lineno}: missing "reference" (the ground-truth answer)')
        rid = str(rec.get("id") or hashlib.sha1(rec["prompt"].encode()).hexdigest()[:12])
        if rid in ids:
            raise TaskFileError(f"{path}:{lineno}: duplicate id {rid!r}")
        ids.add(rid)
        extra = {k: v for k, v in rec.items() if k not in ("id", "prompt", "reference", "chain")}
        problems.append(Problem(id=rid, prompt=rec["prompt"], reference=str(rec["reference"]),
                                chain=rec.get("chain"), extra=extra))
    if not problems:
        raise TaskFileError(f"{path}: no records")
    return problems


def split_task_file(problems: list[Problem], split: str, eval_fraction: float) -> list[Problem]:
    """The records of one split, chosen by the hash of each prompt (stable, disjoint)."""
    return [p for p in problems if split_of(p.prompt, eval_fraction) == split]
