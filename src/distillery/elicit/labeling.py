"""Labeling: the teacher answers unlabeled problems, with its reasoning chain, as SFT records."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distillery.records import JsonlWriter, sft_record
from distillery.tasks import Problem, extract_answer
from distillery.teachers.base import SamplingParams, Teacher


def label_problems(
    problems: list[Problem],
    teacher: Teacher,
    params: SamplingParams,
    out_path: str | Path,
    chunk_size: int = 256,
    show_progress: bool = True,
) -> Path:
    """Write one record per problem (and sample) to ``out_path``; resumes a killed run.

    The teacher sees only the prompt, never the reference: these are unlabeled problems.
    Records carry provenance in ``meta`` (method, teacher, seed problem, sampling).
    """
    writer = JsonlWriter(out_path)
    done = writer.done_ids()
    todo = [p for p in problems if _record_id(p.id, 0) not in done]
    columns = (TextColumn("[bold]label"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress) as progress:
        bar = progress.add_task("label", total=len(problems), completed=len(problems) - len(todo))
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            convs = [[{"role": "user", "content": p.prompt}] for p in chunk]
            outputs = teacher.generate(convs, params)
            records = []
            for problem, gens in zip(chunk, outputs):
                for j, g in enumerate(gens):
                    records.append(
                        sft_record(
                            _record_id(problem.id, j), problem.prompt, g.text, reference=None,
                            method="labeling", teacher=teacher.name, seed_id=problem.id,
                            sampling=asdict(params), finish_reason=g.finish_reason,
                            parsed_answer=extract_answer(g.text),
                        )
                    )
            writer.write(records)
            progress.advance(bar, len(chunk))
    return writer.finish()


def _record_id(problem_id: str, sample: int) -> str:
    return f"{problem_id}-s{sample}"
