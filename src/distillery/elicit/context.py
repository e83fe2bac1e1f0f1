"""What every elicitation method gets to work with, and what it hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from distillery.answers import GraderOptions
from distillery.elicit.filters import FilterConfig, run_filters
from distillery.elicit.labeling import LabelingConfig, run_labeling
from distillery.elicit.seeds import Seed
from distillery.teachers.base import SamplingParams, Teacher
from distillery.teachers.phases import PhaseSummary, ResponseCache


@dataclass
class ElicitContext:
    """The seeds, the models and the places a method needs; built by :func:`run_generate`.

    ``student`` is the model being distilled, for the methods that look at its outputs
    (feedback, self-knowledge); None for the others. ``work_dir`` holds the phase files.
    """

    seeds: list[Seed]
    teacher: Teacher
    params: SamplingParams
    work_dir: Path
    labeling: LabelingConfig
    filters: FilterConfig
    student: Teacher | None = None
    cache: ResponseCache | None = None
    show_progress: bool = True
    grader: GraderOptions | None = None  # the seeds' task grader: how answers are verified

    def label(self, seeds: list[Seed], phase: str, method: str) -> tuple[Path, PhaseSummary]:
        """Label ``seeds`` with the teacher (the last phase of expansion and curation)."""
        return run_labeling(seeds, self.teacher, self.labeling, self.params, self.work_dir,
                            phase=phase, method=method, cache=self.cache,
                            show_progress=self.show_progress)

    def dedup_texts(self, items: list[Seed]) -> tuple[list[Seed], list[tuple[Seed, str]]]:
        """Exact + near-duplicate removal over seed prompts (new instructions, tasks)."""
        cfg = self.filters.model_copy(update={
            "min_chars": None, "max_chars": None, "require_pattern": None, "verify": False,
            "min_judge_score": None, "drop_refusals": False})
        records = [{"id": s.id, "messages": [{"role": "user", "content": s.prompt},
                                             {"role": "assistant", "content": ""}]} for s in items]
        report = run_filters(records, cfg)
        by_id = {s.id: s for s in items}
        kept = [by_id[r["id"]] for r in report.kept]
        dropped = [(by_id[r["record"]["id"]], f'{r["filter"]}: {r["reason"]}') for r in report.rejected]
        return kept, dropped


@dataclass
class MethodResult:
    """The files a method produced: SFT records and/or preference records, and phase counts."""

    records: Path | None = None  # SFT "messages" records
    preferences: Path | None = None  # "prompt/chosen/rejected" records
    phases: list[PhaseSummary] = field(default_factory=list)
    notes: dict = field(default_factory=dict)  # method-specific figures for the summary
