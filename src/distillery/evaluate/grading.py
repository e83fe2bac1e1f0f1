"""The task's grader, wired to what it needs from this layer: a judge model for ``judge``
(any teacher backend, built from ``task.grader.model`` or ``eval.judge.model``) and, for
``multiple_choice``, the evaluated model's log-likelihood of each option.

:mod:`distillery.answers` sits below the teachers and models, so it never builds them; this
module does, and hands them over as plain callables.
"""

from __future__ import annotations

from collections.abc import Sequence

from distillery.answers import Grader, GraderOptions, JudgeFn, OptionScorer, build_grader
from distillery.chat import prompt_text
from distillery.config import ConfigError, TeacherConfig
from distillery.evaluate.metrics import multiple_choice_loglik
from distillery.tasks import Problem
from distillery.teachers import HFTeacher, SamplingParams, Teacher, build_teacher

__all__ = ["judge_fn", "task_grader"]


def judge_fn(teacher: Teacher, max_new_tokens: int, seed: int = 0) -> JudgeFn:
    """A :class:`~distillery.answers.JudgeFn` over ``teacher``: each judge prompt as one user
    turn, greedy, all prompts in one call (a remote backend sends them concurrently)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)

    def judge(prompts: list[str]) -> list[str | None]:
        outputs = teacher.generate([[{"role": "user", "content": p}] for p in prompts], params)
        return [gens[0].text if gens else None for gens in outputs]

    return judge


def judge_teacher(options: GraderOptions, fallback: TeacherConfig | None) -> Teacher | None:
    """The judge model a ``judge`` grader names (``task.grader.model``, else ``fallback``:
    ``eval.judge.model``); None for every other grader."""
    if options.name != "judge":
        return None
    raw = getattr(options, "model", None)
    if raw is None and fallback is None:
        raise ConfigError("task.grader is 'judge' but names no judge model: set task.grader.model "
                          "(a teacher config, e.g. {backend: openai, model: ..., base_urls: [...]}) "
                          "or eval.judge.model")
    try:
        cfg = TeacherConfig.model_validate(raw) if raw is not None else fallback
    except ValueError as exc:
        raise ConfigError(f"task.grader.model is not a valid teacher config: {exc}") from None
    return build_teacher(cfg)


def option_scorer(teacher: HFTeacher, problems: Sequence[Problem]) -> OptionScorer:
    """Log-likelihood of each option after the problem's prompt as the model sees it (its chat
    turns rendered), summed over the option's tokens."""
    rendered = {p.prompt: prompt_text(p.messages, teacher.tokenizer) for p in problems}

    def score(prompt: str, options: Sequence[str]) -> list[float]:
        context = rendered.get(prompt, prompt)
        return multiple_choice_loglik(teacher.model, teacher.tokenizer, context, list(options)).logliks

    return score


def task_grader(
    options: GraderOptions, *, judge: Teacher | None = None, model: HFTeacher | None = None,
    problems: Sequence[Problem] = (),
) -> Grader:
    """The grader ``task.grader`` names, with the judge model (``judge``) and the evaluated
    model's option scorer (``model``, for multiple choice) it needs."""
    max_new = getattr(options, "max_new_tokens", 256)
    return build_grader(
        options,
        judge=judge_fn(judge, max_new) if judge is not None else None,
        scorer=option_scorer(model, problems) if model is not None and options.name == "multiple_choice" else None,
    )
