"""Seeds: the prompts an elicitation method starts from, with references where known.

From the built-in task generator (``seeds.task``), or a JSONL file (``seeds.path``) whose
lines are ``{"prompt": str, "reference"?: str, "id"?: str, "topic"?: str}`` or "messages"
records (the user turns are the prompt, a final assistant turn is ignored).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from distillery.config import TaskConfig
from distillery.errors import DistilleryError
from distillery.records import iter_jsonl

if TYPE_CHECKING:
    from distillery.tasks import Problem


class SeedError(DistilleryError, ValueError):
    """A seed file that cannot be read, naming the file and line."""


@dataclass
class Seed:
    """One starting prompt; ``reference`` is its known answer (None when unknown)."""

    id: str
    prompt: str
    reference: str | None = None
    extra: dict = field(default_factory=dict)  # anything else on the line (topic, ...)
    system: str | None = None  # the task's system prompt, for seeds drawn from a task


def prompt_turns(user: str, system: str | None) -> list[dict[str, str]]:
    """The prompt turns of a record made from a seed: its system turn (if any), then ``user``
    (the seed's prompt, or the instruction sent when a method keeps it)."""
    return [*([{"role": "system", "content": system}] if system else []),
            {"role": "user", "content": user}]


def seed_id(text: str) -> str:
    """A stable id from the text: the same prompt gets the same id in every run."""
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def read_seed_file(path: str | Path) -> list[Seed]:
    path = Path(path)
    if not path.is_file():
        raise SeedError(f"seed file not found: {path}")
    seeds, ids = [], set()
    for lineno, rec in iter_jsonl(path, SeedError):
        prompt = _prompt_of(rec)
        if prompt is None:
            raise SeedError(f'{path}:{lineno}: needs a string "prompt" or a "messages" list '
                            "with a user turn")
        sid = str(rec.get("id") or seed_id(prompt))
        if sid in ids:
            raise SeedError(f"{path}:{lineno}: duplicate id {sid!r}")
        ids.add(sid)
        ref = rec.get("reference")
        extra = {k: v for k, v in rec.items() if k not in ("id", "prompt", "messages", "reference")}
        seeds.append(Seed(sid, prompt, None if ref is None else str(ref), extra))
    if not seeds:
        raise SeedError(f"{path}: no seeds")
    return seeds


def _prompt_of(rec: object) -> str | None:
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"]
    msgs = rec.get("messages")
    if isinstance(msgs, list):
        users = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
        if users and all(isinstance(u, str) for u in users):
            return "\n\n".join(users)
    return None


def load_seeds(task: TaskConfig | None, path: str | None, split: str, num: int | None,
               seed: int = 0) -> list[Seed]:
    """Seeds from the task generator or a file; ``num`` of them (all when None)."""
    if path is not None:
        seeds = read_seed_file(path)
        if num is not None and num < len(seeds):
            seeds = random.Random(seed).sample(seeds, num)
        return seeds
    if task is None:
        raise SeedError("seeds: give seeds.path (a JSONL file) or seeds.task (a task config)")
    from distillery.tasks import load_problems

    return task_seeds(load_problems(task, split, num or 1000, seed=seed))


def task_seeds(problems: list[Problem]) -> list[Seed]:
    """Seeds of task problems that carry the task's turns (``Problem.messages``): the prompt is
    the rendered user turn and ``system`` the system turn, so the records made from them hold
    exactly what evaluation sends for the same problem."""
    seeds = []
    for p in problems:
        system = next((m["content"] for m in p.messages if m["role"] == "system"), None)
        user = next(m["content"] for m in p.messages if m["role"] == "user")
        seeds.append(Seed(p.id, user, p.reference, dict(p.extra), system))
    return seeds
