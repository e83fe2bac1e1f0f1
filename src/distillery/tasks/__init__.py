"""Built-in tasks and user task files: problems with ground-truth answers."""

from __future__ import annotations

import random
from dataclasses import replace

from distillery.answers import GradeItem, GraderOptions, grade
from distillery.chat import task_messages
from distillery.config import DataConfig, TaskConfig
from distillery.records import (
    drop_empty_answers,
    ground_truth_records,
    read_jsonl,
    validate_sft_records,
)
from distillery.tasks.arithmetic import Problem, generate_problems
from distillery.tasks.jsonl import read_task_file, split_task_file

__all__ = ["Problem", "is_correct", "load_problems", "task_items"]


def load_problems(cfg: TaskConfig, split: str, n: int, seed: int = 0) -> list[Problem]:
    """``n`` problems of ``split`` ('train' or 'eval') from the configured task, each with the
    ``messages`` a model is sent for it (:func:`distillery.chat.task_messages`): generation,
    training records, capture and evaluation all read those, so they send the same turns."""
    if cfg.name == "arithmetic":
        pool = generate_problems(cfg, split, n, seed)
    else:
        if split == "eval" and cfg.eval_path:
            pool = read_task_file(cfg.eval_path)
        else:
            pool = read_task_file(cfg.path)  # type: ignore[arg-type]
            if not (split == "train" and cfg.eval_path):
                pool = split_task_file(pool, split, cfg.eval_fraction)
        if n < len(pool):
            pool = random.Random(f"{seed}:{split}").sample(pool, n)
    return [replace(p, messages=task_messages(cfg, p)) for p in pool]


def load_records(data: DataConfig, validate: bool = True) -> list[dict]:
    """The records a ``data`` section names: a JSONL file, or the task's train problems with
    ground-truth targets. The train and capture stages both read their data through this, so a
    cache captured from a data section lines up with a student trained on the same section.

    ``validate`` checks "messages" records and leaves out, with a warning, those with an empty
    answer (:func:`~distillery.records.drop_empty_answers`); off for preference records,
    checked by their own objective.
    """
    if data.path is not None:
        records = read_jsonl(data.path)
        if validate:
            validate_sft_records(records, data.path)
            records = drop_empty_answers(records, data.path)
        return records[: data.num_examples]
    assert data.task is not None  # DataConfig requires exactly one of path or task
    problems = load_problems(data.task, "train", data.num_examples, seed=data.seed)
    return ground_truth_records(problems, data.target)


def is_correct(output: str, reference: str, grader: GraderOptions | str | None = None) -> bool:
    """Whether ``output`` answers ``reference`` correctly by ``grader`` (the task's
    ``task.grader``; None: numeric), through :mod:`distillery.answers`."""
    return grade(output, reference, grader).correct


def task_items(problems: list[Problem], outputs: list[str | None]) -> list[GradeItem]:
    """What a grader sees of each problem: its output, reference, prompt and (for multiple
    choice) the JSONL line's ``options`` (or ``choices``)."""
    items = []
    for problem, output in zip(problems, outputs, strict=True):
        options = problem.extra.get("options", problem.extra.get("choices"))
        items.append(GradeItem(output, problem.reference, problem.prompt,
                               tuple(str(o) for o in options) if isinstance(options, list) else None))
    return items
