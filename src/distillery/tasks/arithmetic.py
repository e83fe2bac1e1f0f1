"""Multi-step arithmetic with reasoning chains: the demo's task, procedurally generated.

A problem is a list of operands and operators, e.g. ``22+55*2``. Its canonical chain does one
operation per step, multiplications first, then left to right, and ends with ``#answer``::

    prompt: 22+55*2        chain: 55*2=110;22+110=132;#132        answer-only target: #132

The held-out split is disjoint from the train split by construction: every problem's canonical
text is hashed, and the hash alone decides the split it belongs to. Generation is seeded, so the
same config yields the same problems on every machine.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from distillery.config import TaskConfig, as_range
from distillery.errors import DistilleryError

_WORD_OPS = {"+": "add {n}", "-": "subtract {n}", "*": "multiply by {n}"}


class TaskSpaceError(DistilleryError, RuntimeError):
    """The task's settings admit fewer distinct problems than asked for; names the settings."""


@dataclass(frozen=True)
class Problem:
    """One task item: the prompt shown to a model, its answer, and the canonical chain.

    ``extra``: the item's other fields (a JSONL task line's other keys), which a task's
    ``prompt_template`` can use. ``messages``: the turns a model is sent for it, the task's
    system prompt and rendered template (:func:`~distillery.tasks.load_problems` sets them
    through :func:`distillery.chat.task_messages`); a problem made without a task gets its bare
    prompt as the user turn.
    """

    id: str
    prompt: str
    reference: str
    chain: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)
    messages: list[dict[str, str]] = field(default_factory=list, hash=False, compare=False)

    def __post_init__(self) -> None:
        if not self.messages:  # frozen: the default is set through object.__setattr__
            object.__setattr__(self, "messages", [{"role": "user", "content": self.prompt}])

    def target(self, kind: str) -> str:
        """The assistant text a model is trained on: the full chain, or the answer alone."""
        if kind == "chain" and self.chain is not None:
            return self.chain
        return f"#{self.reference}"


def solve(operands: list[int], ops: list[str]) -> tuple[int, list[str]]:
    """Evaluate with the usual precedence; return the answer and the chain steps."""
    nums, rest_ops, steps = list(operands), list(ops), []
    # multiplications first, left to right
    i = 0
    while i < len(rest_ops):
        if rest_ops[i] == "*":
            value = nums[i] * nums[i + 1]
            steps.append(f"{nums[i]}*{nums[i + 1]}={value}")
            nums[i : i + 2] = [value]
            rest_ops.pop(i)
        else:
            i += 1
    # then additions and subtractions, left to right
    while rest_ops:
        op = rest_ops.pop(0)
        value = nums[0] + nums[1] if op == "+" else nums[0] - nums[1]
        steps.append(f"{nums[0]}{op}{nums[1]}={value}")
        nums[0:2] = [value]
    return nums[0], steps


def _render(operands: list[int], ops: list[str], style: str) -> str:
    if style == "symbolic":
        return str(operands[0]) + "".join(f"{op}{n}" for op, n in zip(ops, operands[1:]))
    parts = [f"Start with {operands[0]}"]
    parts += [_WORD_OPS[op].format(n=n) for op, n in zip(ops, operands[1:])]
    # word problems read left to right, so say so: the chain follows precedence anyway
    return ", then ".join(parts) + ". Use the usual order of operations. What is the result?"


def split_of(canonical: str, eval_fraction: float) -> str:
    """'eval' or 'train', decided by the problem's hash alone (so the splits never overlap)."""
    bucket = int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"


def _sample(rng: random.Random, cfg: TaskConfig) -> tuple[list[int], list[str]]:
    lo_n, hi_n = as_range(cfg.num_operands)
    lo_d, hi_d = as_range(cfg.digits)
    n = rng.randint(max(lo_n, 2), max(hi_n, 2))
    operands = []
    for _ in range(n):
        d = rng.randint(lo_d, hi_d)
        operands.append(rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1))
    ops = [rng.choice(cfg.operations) for _ in range(n - 1)]
    return operands, ops


def iter_problems(cfg: TaskConfig, split: str, seed: int) -> Iterator[Problem]:
    """Endless stream of distinct problems of one split, reproducible from ``seed``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{seed}:{split}")
    seen: set[str] = set()
    misses = 0
    while True:
        operands, ops = _sample(rng, cfg)
        canonical = _render(operands, ops, "symbolic")
        if canonical in seen or split_of(canonical, cfg.eval_fraction) != split:
            misses += 1
            if misses > 10_000 + 50 * len(seen):
                raise TaskSpaceError(
                    f"the task space is exhausted after {len(seen)} distinct {split} problems: "
                    "raise task.digits or task.num_operands, or ask for fewer problems"
                )
            continue
        seen.add(canonical)
        answer, steps = solve(operands, ops)
        digest = hashlib.sha1(canonical.encode()).hexdigest()[:12]
        yield Problem(
            id=f"arith-{split}-{digest}",
            prompt=_render(operands, ops, cfg.style),
            reference=str(answer),
            chain=";".join(steps) + f";#{answer}",
        )


def generate_problems(cfg: TaskConfig, split: str, n: int, seed: int = 0) -> list[Problem]:
    """``n`` distinct problems of ``split`` ('train' or 'eval')."""
    stream = iter_problems(cfg, split, seed)
    return [next(stream) for _ in range(n)]
