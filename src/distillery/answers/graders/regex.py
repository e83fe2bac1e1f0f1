"""``regex``: the answer is what a user's pattern captures (its one group, or a group named
``answer``) at its last match; compared by value when answer and reference are both numbers,
else as text (casefolded, whitespace collapsed). No match is "no answer"."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import field_validator

from distillery.answers.extract import ExtractedAnswer, extract_with_pattern
from distillery.answers.graders.base import (
    GradeItem,
    Grader,
    GraderOptions,
    register,
)
from distillery.answers.graders.numeric import same_number_or_text


class RegexOptions(GraderOptions):
    name: Literal["regex"] = "regex"
    pattern: str  # e.g. "ANSWER=\\[(.+?)\\]"; multi-line mode (^ and $ match at each line)

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, value: str) -> str:
        try:
            regex = re.compile(value, re.MULTILINE)
        except re.error as exc:
            raise ValueError(f"pattern is not a valid regular expression: {exc}") from None
        if regex.groups != 1 and "answer" not in regex.groupindex:
            raise ValueError(f"pattern {value!r} has {regex.groups} groups: give exactly one group "
                             "(or a group named 'answer') around the answer, e.g. 'ANSWER=(\\d+)'")
        return value


@register(RegexOptions)
class RegexGrader(Grader):
    options: RegexOptions

    def read(self, output: str | None) -> ExtractedAnswer:
        return extract_with_pattern(output, self.options.pattern)

    def compare(self, answer: str, item: GradeItem) -> float:
        return float(same_number_or_text(answer, str(item.reference)))
