"""A deterministic, rule-based judge backend for tests: a real ``Teacher``, no model behind it.

It reads the judge prompts that distillery's templates render (the MT-Bench markers
``[The Start of Assistant A's Answer]`` ...) and answers by a rule, so a test knows exactly
what a perfect judge, a position-biased judge or a length-biased judge would say:

- :func:`always` — the same position every time (``[[A]]``): pure position bias;
- :func:`prefers_correct` — the answer that matches the reference (``[[C]]`` when both or
  neither do);
- :func:`prefers_longer` — the longer answer with probability ``σ(k·tanh(|Δlen|/scale))``,
  drawn from a hash of the two answers (the same in both orders, so no position bias);
- :func:`grade_by_reference` — pointwise: ``Score: 9`` right, ``Score: 3`` wrong, ``Score: 5``
  without a reference, and a refusal (no score) when the answer has no final answer at all.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from distillery.tasks import extract_answer, is_correct
from distillery.teachers.base import (
    Generation,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    SamplingParams,
    generate_via_stream,
)


def _section(text: str, title: str) -> str | None:
    m = re.search(rf"\[The Start of {re.escape(title)}\]\n(.*?)\n\[The End of {re.escape(title)}\]", text, re.S)
    return m.group(1) if m else None


@dataclass
class View:
    """What the judge prompt shows: one answer (pointwise) or two (pairwise), and a reference."""

    answers: list[str]
    reference: str | None

    @classmethod
    def parse(cls, prompt: str) -> View:
        reference = _section(prompt, "Reference Answer")
        pair = [_section(prompt, "Assistant A's Answer"), _section(prompt, "Assistant B's Answer")]
        if None not in pair:
            return cls(pair, reference)  # type: ignore[arg-type]
        single = _section(prompt, "Assistant's Answer")
        if single is None:
            raise ValueError(f"not a judge prompt: {prompt[:80]!r}")
        return cls([single], reference)


Rule = Callable[[View], str]


class Crash(RuntimeError):
    """What a judge that "dies" mid-run raises (a killed process, for resume tests)."""


class RuleJudge:
    """A ``Teacher`` (``generate``/``stream``) whose replies come from ``rule``.

    ``crash_after``: raise :class:`Crash` after that many answered requests, as a killed run
    would stop. ``stats.requests`` counts the requests it answered.
    """

    def __init__(self, rule: Rule, name: str = "rule-judge", crash_after: int | None = None) -> None:
        self.rule, self.name, self.crash_after = rule, name, crash_after
        self.stats = GenerationStats()

    def generate(self, conversations: list[list[dict]], params: SamplingParams) -> list[list[Generation]]:
        return generate_via_stream(self, conversations, params)

    def stream(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResult]:
        for req in requests:
            if self.crash_after is not None and self.stats.requests >= self.crash_after:
                raise Crash(f"{self.name} stopped after {self.stats.requests} requests")
            text = self.rule(View.parse(req.messages[-1]["content"]))
            self.stats.requests += 1
            self.stats.tokens += len(text.split())
            yield GenerationResult(req, [Generation(text, len(text.split()), "stop")])


# --------------------------------------------------------------------------- rules


def always(position: str) -> Rule:
    return lambda view: f"Both are fine; I pick the {position} one. [[{position}]]"


def prefers_correct(view: View) -> str:
    a, b = (is_correct(x, view.reference or "") for x in view.answers)
    return "[[C]]" if a == b else ("[[A]]" if a else "[[B]]")


def unit_hash(*parts: str) -> float:
    """A uniform number in [0, 1) from text: deterministic 'randomness'."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def prefers_longer(strength: float, scale: float) -> Rule:
    def rule(view: View) -> str:
        a, b = view.answers
        if a == b:
            return "[[C]]"
        longer, shorter = sorted((a, b), key=lambda s: (-len(s), s))
        p_longer = 1 / (1 + math.exp(-strength * math.tanh((len(longer) - len(shorter)) / scale)))
        winner = longer if unit_hash(longer, shorter) < p_longer else shorter
        return "[[A]]" if winner == a else "[[B]]"

    return rule


def grade_by_reference(view: View) -> str:
    answer = view.answers[0]
    if extract_answer(answer) is None:
        return "I cannot grade this: the response never states a final answer."
    if view.reference is None:
        return "Rationale: an answer, but nothing to check it against.\nScore: 5"
    if is_correct(answer, view.reference):
        return "Rationale: matches the reference.\nScore: 9"
    return "Rationale: differs from the reference.\nScore: 3"
