"""``symbolic``: math equivalence with sympy, guarded (see :mod:`distillery.answers.symbolic`):
``x*(x+1)`` = ``x^2+x``, ``2\\sqrt{3}`` = ``\\sqrt{12}``, ``78-73`` = ``5``. Numbers compare
exactly (or within ``rel_tol``) before sympy is tried; huge numbers and exponents are refused
before parsing, and a comparison that runs past ``timeout_s`` counts as not equal."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from distillery.answers.graders.base import (
    GradeItem,
    Grader,
    GraderOptions,
    register,
)
from distillery.answers.symbolic import SYMBOLIC_TIMEOUT_S, equivalent


class SymbolicOptions(GraderOptions):
    name: Literal["symbolic"] = "symbolic"
    rel_tol: float = Field(0.0, ge=0.0)
    timeout_s: float = Field(SYMBOLIC_TIMEOUT_S, gt=0.0, le=60.0)


@register(SymbolicOptions)
class SymbolicGrader(Grader):
    options: SymbolicOptions

    def compare(self, answer: str, item: GradeItem) -> float:
        return float(equivalent(answer, str(item.reference), rel_tol=self.options.rel_tol,
                                timeout_s=self.options.timeout_s))
