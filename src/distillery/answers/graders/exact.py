"""``exact``: the answer is the reference's text after SQuAD normalization (case, punctuation,
articles and whitespace ignored; ``-5`` ≠ ``5``). An output without an answer marker is its own
answer (short-answer QA: the whole reply is the answer)."""

from __future__ import annotations

from typing import Literal

from distillery.answers.extract import ExtractedAnswer, extract_final_answer
from distillery.answers.graders.base import (
    GradeItem,
    Grader,
    GraderOptions,
    register,
)
from distillery.answers.normalize import normalize_text


class ExactOptions(GraderOptions):
    name: Literal["exact"] = "exact"


def short_answer(output: str | None) -> ExtractedAnswer:
    """The marked answer, else the whole (stripped) output; "none" for an empty output. A bare
    last line is not a marker here: a short answer such as "5 apples" is compared whole."""
    found = extract_final_answer(output)
    if found.how in ("none", "final_line") and isinstance(output, str) and output.strip():
        return ExtractedAnswer(output.strip(), "whole_text", output, 0)
    return found


@register(ExactOptions)
class ExactGrader(Grader):
    def read(self, output: str | None) -> ExtractedAnswer:
        return short_answer(output)

    def compare(self, answer: str, item: GradeItem) -> float:
        return float(normalize_text(answer) == normalize_text(str(item.reference)))
