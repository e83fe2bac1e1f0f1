"""The config of ``distillery generate``: teacher, seeds, method, sampling, filters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distillery.config import StrictModel, TaskConfig, TeacherConfig
from distillery.elicit.curation import CurationConfig
from distillery.elicit.expansion import ExpansionConfig
from distillery.elicit.feedback import FeedbackConfig
from distillery.elicit.filters import FilterConfig
from distillery.elicit.labeling import LabelingConfig
from distillery.elicit.self_knowledge import SelfKnowledgeConfig
from distillery.teachers.base import SamplingParams

METHODS = ("labeling", "expansion", "curation", "feedback", "self_knowledge", "feature")


class SeedsConfig(StrictModel):
    """Where the starting prompts come from: a task generator or a JSONL file."""

    task: TaskConfig | None = None
    path: str | None = None  # {"prompt", "reference"?, "id"?, ...} or "messages" lines
    split: Literal["train", "eval"] = "train"
    num: int | None = Field(1000, ge=1)  # None = every line of the file
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SeedsConfig:
        if (self.task is None) == (self.path is None):
            raise ValueError("seeds: give exactly one of seeds.task (a task config) or seeds.path (a JSONL file)")
        return self


class SamplingConfig(StrictModel):
    """Sampling for the teacher's answers (temperature 0 = greedy)."""

    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    stop: list[str] = Field(default_factory=list)

    def params(self, n: int = 1, **change: object) -> SamplingParams:
        base = dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                    top_p=self.top_p, n=n, seed=self.seed, stop=tuple(self.stop))
        return SamplingParams(**{**base, **change})


class GenerateJobConfig(StrictModel):
    """``distillery generate CONFIG``: one elicitation method, end to end, into ``output_dir``."""

    output_dir: str = "runs/generate"
    method: Literal["labeling", "expansion", "curation", "feedback", "self_knowledge", "feature"] = "labeling"
    teacher: TeacherConfig
    # the model being distilled: samples answers for feedback and self_knowledge
    student: TeacherConfig | None = None
    seeds: SeedsConfig | None = None
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    labeling: LabelingConfig = Field(default_factory=LabelingConfig)
    # one section per method (each defined next to its method, see docs/elicitation/)
    expansion: ExpansionConfig = Field(default_factory=ExpansionConfig)
    curation: CurationConfig | None = None  # needs a taxonomy, so no default
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    self_knowledge: SelfKnowledgeConfig = Field(default_factory=SelfKnowledgeConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    # evaluation prompts to decontaminate against (n-gram overlap); None = no decontamination
    decontaminate: SeedsConfig | None = None
    cache: bool = True  # reuse teacher answers by request hash (output_dir/cache.sqlite)
    cache_path: str | None = None  # share one cache across runs
    # exit with an error (status 2) when more than this share of the teacher's requests got no
    # answer; always when none did. Records made are kept; retryable failures are retried by a
    # re-run of the same command.
    max_failure_rate: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> GenerateJobConfig:
        if self.method in ("feedback", "self_knowledge") and self.student is None:
            raise ValueError(f"method {self.method!r} samples the student's answers: set student "
                             "(backend/model, like teacher)")
        if self.method == "curation" and self.curation is None:
            raise ValueError("method 'curation' needs curation.taxonomy (topics, or topic: [subtopics])")
        if self.method != "curation" and self.seeds is None:
            raise ValueError(f"method {self.method!r} needs seeds (seeds.task or seeds.path)")
        return self
