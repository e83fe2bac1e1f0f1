"""``multiple_choice``: which option the model picked, against the reference option.

With an :class:`~distillery.answers.graders.base.OptionScorer` (``eval`` passes the model's
log-likelihood of each option as a continuation of the prompt, as lm-evaluation-harness does)
and the item's ``options``, the pick is the likeliest option: summed log-likelihood
(``select: sum``, lm-eval's ``acc``) or per UTF-8 byte (``select: normalized``, ``acc_norm``,
which does not favour short options). The output text is then not read at all.

Without a scorer (``distillery grade`` on generated text) the pick is read from the output:
its marked answer (``The answer is (B)``), else the whole reply, taken as a letter (``B``,
``(b)``, ``B.``, ``B) Paris``) or as the text of one of the options. The reference is a letter
or an option's text.
"""

from __future__ import annotations

import re
import string
from typing import Literal

from distillery.answers.extract import ExtractedAnswer
from distillery.answers.graders.base import (
    NO_ANSWER,
    GradeItem,
    Grader,
    GraderOptions,
    Verdict,
    register,
    verdict,
)
from distillery.answers.graders.exact import short_answer
from distillery.answers.normalize import normalize_text

_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:[.):]|\s|$)")


class MultipleChoiceOptions(GraderOptions):
    name: Literal["multiple_choice"] = "multiple_choice"
    select: Literal["sum", "normalized"] = "sum"


def choice_index(text: str | None, options: tuple[str, ...] | None) -> int | None:
    """The option ``text`` names: a letter (A = 0), or an option's own text; None otherwise."""
    if text is None:
        return None
    if options:
        norm = normalize_text(text)
        for i, option in enumerate(options):
            if norm and norm == normalize_text(option):
                return i
    m = _LETTER.match(text.strip())
    if m is None or (len(text.strip()) > 3 and not options):
        return None  # a word that starts with a letter is not a letter choice
    index = string.ascii_uppercase.index(m.group(1).upper())
    return index if options is None or index < len(options) else None


@register(MultipleChoiceOptions)
class MultipleChoiceGrader(Grader):
    options: MultipleChoiceOptions

    def read(self, output: str | None) -> ExtractedAnswer:
        return short_answer(output)

    def compare(self, answer: str, item: GradeItem) -> float:
        return float(choice_index(answer, item.options) == choice_index(str(item.reference), item.options))

    def grade(self, item: GradeItem) -> Verdict:
        if choice_index(str(item.reference), item.options) is None:
            raise ValueError(f"multiple_choice: the reference {item.reference!r} is neither a letter nor "
                             f"one of the options {list(item.options or [])}")
        if self.scorer is not None and item.options:
            logliks = self.scorer(item.prompt, list(item.options))
            if self.options.select == "normalized":
                logliks = [ll / max(len(o.encode("utf-8")), 1) for ll, o in zip(logliks, item.options)]
            pick = max(range(len(logliks)), key=logliks.__getitem__)
            found = ExtractedAnswer(string.ascii_uppercase[pick], "loglik")
        else:
            found = self.extract(item.output)
            if choice_index(found.answer, item.options) is None:
                return NO_ANSWER  # no letter and no option's text: the pick is unreadable
        return verdict(self.compare(found.answer, item), found)
