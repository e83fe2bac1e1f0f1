"""One way to grade an answer: extract → normalize → compare.

Every place that asks "is this answer right?" — the verify filter, labeling's parsed answer,
self-knowledge's verifier, the reward verifier, ``eval``, ``distillery grade`` and
:func:`distillery.tasks.is_correct` — goes through this package, with the task's grader
(``task.grader``, default ``numeric``):

* :mod:`~distillery.answers.extract`: :func:`extract_final_answer` reads the final answer
  (``\\boxed{}``, "The answer is", "Final answer:", ``#### 45``, ``#45``, "; answer 45", a bare
  last line);
* :mod:`~distillery.answers.normalize`: LaTeX clean-up, exact numbers, SQuAD text;
* :mod:`~distillery.answers.symbolic`: guarded sympy equivalence;
* :mod:`~distillery.answers.graders`: the registry (numeric, exact, symbolic, regex,
  multiple_choice, f1, judge).

This is a bottom layer: it imports the standard library, pydantic, sympy and jinja2 (lazily),
and nothing of distillery above it.
"""

from __future__ import annotations

from distillery.answers.extract import (
    ExtractedAnswer,
    clean_answer,
    extract_final_answer,
    extract_with_pattern,
)
from distillery.answers.graders import (
    GradeItem,
    Grader,
    GraderConfig,
    GraderOptions,
    JudgeFn,
    NumericOptions,
    OptionScorer,
    Verdict,
    build_grader,
    grader_names,
)
from distillery.answers.graders.f1 import token_f1
from distillery.answers.normalize import normalize_text
from distillery.answers.symbolic import equivalent

__all__ = [
    "ExtractedAnswer", "GradeItem", "Grader", "GraderConfig", "GraderOptions", "JudgeFn",
    "NumericOptions", "OptionScorer", "Verdict", "build_grader", "clean_answer", "equivalent",
    "extract_final_answer", "extract_with_pattern", "grade", "grader_names", "normalize_text",
    "token_f1",
]


def grade(output: str | None, reference: str, grader: GraderOptions | str | None = None) -> Verdict:
    """One output against its reference with ``grader`` (a config or a name; None: numeric)."""
    return build_grader(grader).grade(GradeItem(output, str(reference)))
