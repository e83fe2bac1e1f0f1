"""Built-in tasks and user task files: problems with ground-truth answers."""

from __future__ import annotations

import random

from distillery.config import TaskConfig
from distillery.tasks.arithmetic import Problem, extract_answer, generate_problems, normalize_answer
from distillery.tasks.jsonl import read_task_file, split_task_file

__all__ = ["Problem", "extract_answer", "load_problems", "normalize_answer", "is_correct"]


def load_problems(cfg: TaskConfig, split: str, n: int, seed: int = 0) -> list[Problem]:
    """``n`` problems of ``split`` ('train' or 'eval') from the configured task."""
    if cfg.name == "arithmetic":
        return generate_problems(cfg, split, n, seed)
    if split == "eval" and cfg.eval_path:
        pool = read_task_file(cfg.eval_path)
    else:
        pool = read_task_file(cfg.path)  # type: ignore[arg-type]
        if not (split == "train" and cfg.eval_path):
            pool = split_task_file(pool, split, cfg.eval_fraction)
    if n < len(pool):
        pool = random.Random(f"{seed}:{split}").sample(pool, n)
    return pool


def is_correct(output: str, reference: str) -> bool:
    """Whether the answer extracted from ``output`` equals the reference after normalization."""
    answer = extract_answer(output)
    return answer is not None and answer == normalize_answer(reference)
