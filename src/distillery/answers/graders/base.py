"""The grader registry: a grader is a config (a pydantic model whose ``name`` is a literal) and
a class that turns one output into a :class:`Verdict`.

Adding a grader is adding one module to this package that defines both and decorates the class
with :func:`register`, then importing it in ``graders/__init__.py``; ``task.grader`` then
accepts its name, and every caller (verify filter, reward verifier, ``eval``, ``grade``)
reaches it through :func:`build_grader`.

Graders that need something from a higher layer get it injected, never imported: the judge a
:class:`JudgeFn` (any teacher backend, wired by ``distillery.evaluate``), multiple choice an
:class:`OptionScorer` (the model's log-likelihood of each option).
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from distillery.answers.extract import ExtractedAnswer, extract_final_answer, extract_with_pattern

__all__ = [
    "GradeItem", "Grader", "GraderOptions", "JudgeFn", "OptionScorer", "Verdict", "build_grader",
    "grader_configs", "grader_names", "register",
]

Status = Literal["correct", "wrong", "no_answer"]


class GraderOptions(BaseModel):
    """Base of every grader's config: unknown keys are errors; ``name`` picks the grader."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)
    name: str


@dataclass(frozen=True)
class GradeItem:
    """What a grader sees of one item: the model's output, the reference answer, and (for the
    judge and multiple choice) the prompt and the options."""

    output: str | None
    reference: str
    prompt: str = ""
    options: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Verdict:
    """One output graded: ``status`` "correct" (score 1), "wrong" (an answer was found and
    scores below 1) or "no_answer" (the output states no answer: a format failure, score 0).
    ``score`` is in [0, 1] (token F1 is fractional); ``answer`` is what was read, ``how`` where."""

    status: Status
    score: float
    answer: str | None
    how: str

    @property
    def correct(self) -> bool:
        return self.status == "correct"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "score": self.score, "answer": self.answer, "how": self.how,
                "correct": self.correct}


def verdict(score: float, found: ExtractedAnswer) -> Verdict:
    """The verdict of an answer that was found, scored ``score`` (1.0 is correct)."""
    return Verdict("correct" if score >= 1.0 else "wrong", float(score), found.answer, found.how)


NO_ANSWER = Verdict("no_answer", 0.0, None, "none")


class JudgeFn(Protocol):
    """An LLM judge: one reply text per judge prompt (in order); None where the call failed."""

    def __call__(self, prompts: list[str]) -> list[str | None]: ...


class OptionScorer(Protocol):
    """The model's log-likelihood of each option as a continuation of ``prompt`` (higher is likelier)."""

    def __call__(self, prompt: str, options: Sequence[str]) -> list[float]: ...


class Grader(ABC):
    """Grades outputs against references: :meth:`extract` reads the answer, :meth:`compare`
    scores it in [0, 1]. ``answer_pattern`` (a regex; its group "answer" or its first group)
    replaces the grader's own reading of the answer, as ``labeling.answer_pattern`` asks.
    ``grade_all`` may batch (the judge does)."""

    name: ClassVar[str]

    def __init__(self, options: GraderOptions, *, judge: JudgeFn | None = None,
                 scorer: OptionScorer | None = None, answer_pattern: str | None = None) -> None:
        self.options = options
        self.judge = judge
        self.scorer = scorer
        self.answer_pattern = answer_pattern

    def extract(self, output: str | None) -> ExtractedAnswer:
        """The answer this grader reads from an output."""
        if self.answer_pattern is not None:
            return extract_with_pattern(output, self.answer_pattern)
        return self.read(output)

    def read(self, output: str | None) -> ExtractedAnswer:
        """The grader's own reading of an answer: the shared extractor unless overridden."""
        return extract_final_answer(output)

    def compare(self, answer: str, item: GradeItem) -> float:
        """The score in [0, 1] of an extracted ``answer`` against ``item.reference``; graders
        that judge whole outputs (the LLM judge) override :meth:`grade_all` instead."""
        raise NotImplementedError(f"grader {self.name!r} grades whole outputs, not extracted answers")

    def grade(self, item: GradeItem) -> Verdict:
        """The verdict on one item."""
        found = self.extract(item.output)
        if found.answer is None:
            return NO_ANSWER
        return verdict(self.compare(found.answer, item), found)

    def grade_all(self, items: Sequence[GradeItem]) -> list[Verdict]:
        return [self.grade(item) for item in items]


_REGISTRY: dict[str, tuple[type[GraderOptions], type[Grader]]] = {}


def register(options: type[GraderOptions]) -> Callable[[type[Grader]], type[Grader]]:
    """Class decorator: register a grader under the default of its config's ``name`` literal."""
    name = options.model_fields["name"].default
    if not isinstance(name, str):
        raise TypeError(f"{options.__name__}.name needs a literal default (the grader's name)")

    def add(cls: type[Grader]) -> type[Grader]:
        if name in _REGISTRY:
            raise ValueError(f"grader {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = (options, cls)
        return cls

    return add


def grader_names() -> list[str]:
    return sorted(_REGISTRY)


def grader_configs() -> tuple[type[GraderOptions], ...]:
    return tuple(options for options, _ in _REGISTRY.values())


def build_grader(options: GraderOptions | str | dict | None = None, *, judge: JudgeFn | None = None,
                 scorer: OptionScorer | None = None, answer_pattern: str | None = None) -> Grader:
    """The grader ``options`` names (a config, a name, or a dict; None: ``numeric``)."""
    if options is None:
        options = "numeric"
    if isinstance(options, str):
        options = {"name": options}
    if isinstance(options, dict):
        name = options.get("name")
        if name not in _REGISTRY:
            raise ValueError(f"unknown grader {name!r}: choose one of {', '.join(grader_names())}")
        options = _REGISTRY[name][0].model_validate(options)
    cls = _REGISTRY[options.name][1]
    return cls(options, judge=judge, scorer=scorer, answer_pattern=answer_pattern)
