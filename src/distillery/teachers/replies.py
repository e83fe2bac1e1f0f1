"""Structured content in a teacher's reply: the JSON objects it embeds, and a 1..N grade.

Used by every stage that asks a model for a verdict: the feedback method's grader (elicit), the
LLM judge (evaluate) and the judge reward (train). A reply that holds no usable grade raises
:class:`~distillery.teachers.phases.MalformedOutput`, which a phase turns into a reject.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from distillery.teachers.phases import MalformedOutput


def json_objects(text: str) -> Iterator[dict]:
    """The JSON objects embedded in a text (in fences or not), first to last."""
    decoder = json.JSONDecoder()
    i = text.find("{")
    while i >= 0:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            yield {str(k).lower(): v for k, v in obj.items()}
        i = text.find("{", end)


_NUM = r"[+-]?\d+(?:\.\d+)?"
_SCALE = rf"\s*(?:/|out\s+of)\s*({_NUM})"
_LABEL = r"(?:score|rating|grade)"
_LINE_SCORE = re.compile(rf"^[\s>*#_-]*{_LABEL}\W{{0,6}}(?:is\s+|of\s+)?\**\s*({_NUM})(?:{_SCALE})?",
                         re.IGNORECASE | re.MULTILINE)
_ANY_SCORE = re.compile(rf"\b{_LABEL}\b\W{{0,6}}(?:is\s+|of\s+)?\**\s*({_NUM})(?:{_SCALE})?", re.IGNORECASE)
_FRACTION = re.compile(rf"(?<![\d.])({_NUM}){_SCALE}(?!\d|\.\d)", re.IGNORECASE)
_RATIONALE = re.compile(r"^[\s>*#_-]*(?:rationale|reason(?:ing)?|explanation|justification|critique)"
                        r"\W{0,4}[:\-]\**\s*", re.IGNORECASE | re.MULTILINE)


def parse_grade(text: str, max_score: int) -> tuple[float, str]:
    """(score, rationale) from a grader's reply; :class:`MalformedOutput` when there is none.

    Reads, in order: a JSON object with ``score`` (and ``rationale``/``reason``/``explanation``);
    a ``Score: 7`` line (markdown, ``7/10`` and ``7 out of 10`` tolerated; the last such line
    wins); ``score`` anywhere followed by a number; a bare ``7/10`` whose scale is
    ``max_score``. A score outside ``1..max_score`` or on another scale is malformed too.
    Integral scores come back as ``int``.
    """
    score, scale, rationale = None, None, None
    for obj in json_objects(text):
        if "score" in obj:
            score = obj["score"]
            rationale = next((obj[k] for k in ("rationale", "reason", "reasoning", "explanation")
                              if isinstance(obj.get(k), str)), "")
    if isinstance(score, str):
        m = re.fullmatch(rf"\s*({_NUM})(?:{_SCALE})?\s*", score)
        score, scale = (m.group(1), m.group(2)) if m else (None, None)
    if isinstance(score, bool) or (score is not None and not isinstance(score, (int, float, str))):
        score = None
    match = None
    if score is None:
        for regex in (_LINE_SCORE, _ANY_SCORE):
            found = list(regex.finditer(text))
            if found:
                match = found[-1]
                break
        else:
            found = [m for m in _FRACTION.finditer(text) if float(m.group(2)) == max_score]
            match = found[-1] if found else None
        if match is None:
            raise MalformedOutput(f"no score in the grader's reply: {text[:80]!r}")
        score, scale = match.group(1), match.group(2)
    value = float(score)
    if scale is not None and float(scale) != max_score:
        raise MalformedOutput(f"score {value:g}/{float(scale):g} is not on the 1..{max_score} scale")
    if not 1 <= value <= max_score:
        raise MalformedOutput(f"score {value:g} outside 1..{max_score}")
    if rationale is None:
        rationale = _rationale(text, match)
    return (int(value) if value.is_integer() else value), rationale.strip()


def _rationale(text: str, score_match: re.Match | None) -> str:
    """The "Rationale: ..." text (up to a later score line), else the reply minus the score line."""
    found = list(_RATIONALE.finditer(text))
    if found:
        rest = text[found[-1].end():]
        cut = _LINE_SCORE.search(rest)
        return rest[: cut.start()] if cut else rest
    if score_match is None:
        return text
    start = text.rfind("\n", 0, score_match.start()) + 1
    end = text.find("\n", score_match.end())
    return (text[:start] + (text[end:] if end >= 0 else "")).strip()
