"""Graders, one module each, registered by name; :data:`GraderConfig` is the config union that
``task.grader`` takes (``grader: numeric`` or ``{name: regex, pattern: ...}``)."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field

# each import registers one grader; a new grader is one more line here
from distillery.answers.graders import exact, f1, judge, multiple_choice, numeric, regex, symbolic
from distillery.answers.graders.base import (
    GradeItem,
    Grader,
    GraderOptions,
    JudgeFn,
    OptionScorer,
    Verdict,
    build_grader,
    grader_configs,
    grader_names,
    register,
)
from distillery.answers.graders.numeric import NumericOptions

__all__ = [
    "GradeItem", "Grader", "GraderConfig", "GraderOptions", "JudgeFn", "NumericOptions",
    "OptionScorer", "Verdict", "build_grader", "exact", "f1", "grader_configs", "grader_names",
    "judge", "multiple_choice", "numeric", "regex", "register", "symbolic",
]


def _shorthand(value: Any) -> Any:
    """``grader: numeric`` means ``grader: {name: numeric}``; options without a name are the
    default grader's (so the override ``task.grader.rel_tol=0.01`` works)."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and "name" not in value:
        return {"name": "numeric", **value}
    return value


GraderConfig = Annotated[
    Annotated[Union[grader_configs()], Field(discriminator="name")],  # type: ignore[valid-type]  # noqa: UP007
    BeforeValidator(_shorthand),
]
