"""``f1``: SQuAD token F1 between the answer (marked, else the whole output) and the reference,
in [0, 1]; "correct" only at 1. Accuracy over items is then the mean F1."""

from __future__ import annotations

from collections import Counter
from typing import Literal

from distillery.answers.extract import ExtractedAnswer
from distillery.answers.graders.base import (
    GradeItem,
    Grader,
    GraderOptions,
    register,
)
from distillery.answers.graders.exact import short_answer
from distillery.answers.normalize import normalize_text


class F1Options(GraderOptions):
    name: Literal["f1"] = "f1"


def token_f1(pred: str | None, ref: str) -> float:
    """SQuAD token F1 between the normalized texts, in [0, 1].

    Precision and recall over the multiset of tokens; two empty texts score 1, one empty 0.
    """
    p, r = normalize_text(pred).split(), normalize_text(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


@register(F1Options)
class F1Grader(Grader):
    def read(self, output: str | None) -> ExtractedAnswer:
        return short_answer(output)

    def compare(self, answer: str, item: GradeItem) -> float:
        return token_f1(answer, str(item.reference))
