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
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from distillery.config import TaskConfig, _as_range

_WORD_OPS = {"+": "add {n}", "-": "subtract {n}", "*": "multiply by {n}"}


@dataclass(frozen=True)
class Problem:
    """One task item: the prompt shown to a model, its answer, and the canonical chain."""

    id: str
    prompt: str
    reference: str
    chain: str | None = None

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
    lo_n, hi_n = _as_range(cfg.num_operands)
    lo_d, hi_d = _as_range(cfg.digits)
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
                raise RuntimeError(
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


_HASH_ANSWER = re.compile(r"#\s*(-?\d[\d,]*(?:\.\d+)?)")
_SAID_ANSWER = re.compile(r"answer is[:\s]*\$?\s*(-?[\d,]+(?:\.\d+)?)", re.IGNORECASE)


def extract_answer(output: str) -> str | None:
    """The final answer in a model's output, or None when the output holds no answer.

    Accepts ``...;#132`` (the demo's format) and ``The answer is 132`` (a common free-text
    format). Deliberately does not fall back to "the last number": a chain cut off mid-way
    would then count as an answer, hiding a format failure behind a wrong answer.
    """
    if not isinstance(output, str):
        return None
    found = _HASH_ANSWER.findall(output) or _SAID_ANSWER.findall(output)
    if not found:
        return None
    return normalize_answer(found[-1])


def normalize_answer(text: str) -> str:
    """Canonical text of an answer: numbers without commas/leading zeros/trailing '.0'."""
    text = text.strip().replace(",", "").rstrip(".")
    try:
        return str(int(text))  # exact, however many digits
    except ValueError:
        pass
    try:
        value = Decimal(text)
    except InvalidOperation:
        return " ".join(text.lower().split())
    if not value.is_finite():
        return " ".join(text.lower().split())
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")
