"""``judge``: an LLM judge says whether a free-text output answers the question correctly.

The judge itself is a :class:`~distillery.answers.graders.base.JudgeFn` injected by the caller
(``distillery.evaluate`` builds it from ``model``, a teacher config of any backend: hf, openai,
vllm), so this layer imports no model code. The template (sandboxed Jinja2; variables
``prompt``, ``output``, ``reference``) asks for a last line ``VERDICT: CORRECT`` or
``VERDICT: INCORRECT``; a reply without one is "no_answer" (the judge's format failure, kept
apart from a wrong output). All items go to the judge in one batch, so a remote backend
answers them concurrently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from distillery.answers.graders.base import GradeItem, Grader, GraderOptions, Verdict, register
from distillery.chat import render

DEFAULT_TEMPLATE = """Please act as an impartial judge and decide whether the answer of an AI assistant \
to the question below is correct, by comparing its final answer with the reference answer. \
Wording, working and format do not matter; only whether the final answer is the same.

[Question]
{{ prompt }}

[The Start of Reference Answer]
{{ reference }}
[The End of Reference Answer]

[The Start of Assistant's Answer]
{{ output }}
[The End of Assistant's Answer]

Explain in one short sentence, then end with a last line that is exactly
VERDICT: CORRECT
or
VERDICT: INCORRECT"""

_VERDICT = re.compile(r"verdict\s*:?\s*\**\s*(correct|incorrect)\b", re.IGNORECASE)


class JudgeOptions(GraderOptions):
    name: Literal["judge"] = "judge"
    # the judge model: a teacher config (backend hf/openai/vllm, model, base_urls, ...); null:
    # eval.judge.model when evaluating
    model: dict[str, Any] | None = None
    template: str | None = None  # Jinja2 text; null: DEFAULT_TEMPLATE
    max_new_tokens: int = Field(256, ge=1)


def parse_verdict(reply: str | None) -> bool | None:
    """True/False from the judge's last ``VERDICT:`` line; None when it gives none."""
    if not isinstance(reply, str):
        return None
    found = _VERDICT.findall(reply)
    return found[-1].lower() == "correct" if found else None


def render_judge_prompt(template: str, item: GradeItem) -> str:
    # the one sandbox every user template renders in (distillery.chat)
    return render(template, "task.grader.template", prompt=item.prompt, output=item.output or "",
                  reference=str(item.reference))


@register(JudgeOptions)
class JudgeGrader(Grader):
    options: JudgeOptions

    def grade(self, item: GradeItem) -> Verdict:
        return self.grade_all([item])[0]

    def grade_all(self, items: Sequence[GradeItem]) -> list[Verdict]:
        if self.judge is None:
            raise ValueError("the judge grader needs a judge model: set task.grader.model (a teacher "
                             "config: backend, model, ...) or eval.judge")
        template = self.options.template or DEFAULT_TEMPLATE
        todo = [i for i, item in enumerate(items) if isinstance(item.output, str) and item.output.strip()]
        replies = self.judge([render_judge_prompt(template, items[i]) for i in todo]) if todo else []
        out = [Verdict("no_answer", 0.0, None, "none") for _ in items]
        for i, reply in zip(todo, replies, strict=True):
            ok = parse_verdict(reply)
            if ok is not None:
                out[i] = Verdict("correct" if ok else "wrong", float(ok), items[i].output, "judge")
            else:
                out[i] = Verdict("no_answer", 0.0, None, "judge_unparsed")
        return out
