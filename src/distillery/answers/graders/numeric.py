"""``numeric``: the stated answer is the reference number (the default for numeric references).

The answer is read by the shared extractor, then compared by exact value (``3/4`` = ``0.75``,
``1,000`` = ``1000``, ``50%`` = ``0.5``), or within ``rel_tol``. An answer that is not a plain
number (``The answer is 78-73``) is *wrong*, never cut to its first number and never evaluated
(``symbolic`` evaluates it). A reference that is not a number is compared as text, casefolded
with whitespace collapsed. On the demo's chains (``...;#79``) this is what the arithmetic task
has always counted as correct.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from distillery.answers.graders.base import (
    GradeItem,
    Grader,
    GraderOptions,
    register,
)
from distillery.answers.normalize import fold_text, light_normalize
from distillery.answers.symbolic import numbers_equal


class NumericOptions(GraderOptions):
    name: Literal["numeric"] = "numeric"
    rel_tol: float = Field(0.0, ge=0.0)  # 0: exact equality of values


@register(NumericOptions)
class NumericGrader(Grader):
    options: NumericOptions

    def compare(self, answer: str, item: GradeItem) -> float:
        return float(same_number_or_text(answer, str(item.reference), self.options.rel_tol))


def same_number_or_text(answer: str, reference: str, rel_tol: float = 0.0) -> bool:
    """Equal values when both are plain numbers; else the same text (casefolded)."""
    a, ref = light_normalize(answer), light_normalize(reference)
    same = numbers_equal(a, ref, rel_tol=rel_tol)
    if same is None:  # one side is not a number: equal only as the same text
        same = fold_text(a) == fold_text(ref)
    return same
