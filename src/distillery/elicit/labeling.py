"""Labeling: the teacher answers prompts, optionally with a reasoning chain, as SFT records.

With ``chain_of_thought`` the prompt goes through a template that asks for step-by-step
reasoning and a marked final answer; :func:`parse_answer` then splits the teacher's text into
rationale and answer. The record's user turn is the original prompt (the student should learn
to reason without being told to), unless ``keep_instruction`` is set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import Field

from distillery.answers import extract_final_answer, extract_with_pattern
from distillery.chat import builtin, render
from distillery.config import StrictModel
from distillery.elicit.seeds import Seed, prompt_turns
from distillery.records import sft_record
from distillery.teachers.base import GenerationRequest, GenerationResult, SamplingParams, Teacher
from distillery.teachers.phases import Outcome, PhaseSummary, RecordCheck, ResponseCache, run_phase


class LabelingConfig(StrictModel):
    """How the teacher is asked, and how its answer is read."""

    chain_of_thought: bool = True
    # Jinja2 text or @file; variables: prompt. Default: the built-in CoT or plain template.
    template: str | None = None
    system: str | None = None  # an optional system turn sent to the teacher
    # a regex whose group "answer" (or group 1) is the final answer; default: the shared
    # extractor of distillery.answers (\boxed{...}, "Final answer:", "The answer is", "#N", ...)
    answer_pattern: str | None = None
    require_answer: bool = True  # no parsable final answer -> reject
    drop_truncated: bool = True  # stopped by max_new_tokens -> reject
    keep_instruction: bool = False  # the record's user turn is the templated prompt
    samples: int = Field(1, ge=1)  # answers per prompt (needs temperature > 0 when > 1)

    def prompt_template(self) -> str:
        return self.template or builtin("labeling_cot" if self.chain_of_thought else "labeling_plain")


def parse_answer(text: str, pattern: str | None = None) -> tuple[str, str | None]:
    """Split a teacher's text into (rationale, final answer); answer None when there is none.

    The answer is read by :mod:`distillery.answers` (``pattern``, when given, else the shared
    extractor: ``\\boxed{}``, "Final answer:", "The answer is", ``#N``, a bare last line);
    the rationale is the text before the answer's marker.
    """
    found = extract_with_pattern(text, pattern) if pattern is not None else extract_final_answer(text)
    if found.answer is None or found.start is None:
        return text.strip(), None
    return text[: found.start].strip().rstrip(";").strip(), found.answer


def labeling_requests(seeds: Iterable[Seed], cfg: LabelingConfig, params: SamplingParams,
                      phase: str = "labeled") -> Iterator[GenerationRequest]:
    """One request per seed; ``meta`` keeps the seed for the handler."""
    template = cfg.prompt_template()
    for seed in seeds:
        user = render(template, "labeling.template", prompt=seed.prompt, **seed.extra)
        system = cfg.system or seed.system  # labeling.system overrides the task's for the teacher
        messages = ([{"role": "system", "content": system}] if system else [])
        messages.append({"role": "user", "content": user})
        yield GenerationRequest(f"{phase}:{seed.id}", messages, params,
                                meta={"seed_id": seed.id, "prompt": seed.prompt, "system": seed.system,
                                      "reference": seed.reference, "extra": seed.extra})


def labeling_handler(cfg: LabelingConfig, teacher_name: str, method: str = "labeling"):  # noqa: ANN201
    """Result -> one SFT record per generation (or a reject naming what was wrong)."""

    def handle(result: GenerationResult) -> Outcome:
        req, out = result.request, Outcome()
        seed_id, prompt = req.meta["seed_id"], req.meta["prompt"]
        user = req.messages[-1]["content"] if cfg.keep_instruction else prompt
        # the record's turns: the task's system turn and prompt, what evaluation sends
        turns = prompt_turns(user, req.meta["system"])
        for j, g in enumerate(result.generations):
            rationale, answer = parse_answer(g.text, cfg.answer_pattern)
            if cfg.drop_truncated and g.finish_reason == "length":
                out.rejects.append((f"truncated: stopped at max_new_tokens ({g.num_tokens} tokens)", g.text))
                continue
            if cfg.require_answer and answer is None:
                out.rejects.append(("no_answer: no final answer found in the teacher's text", g.text))
                continue
            out.records.append(sft_record(
                f"{seed_id}-s{j}", turns, g.text.strip(), reference=req.meta["reference"],
                method=method, teacher=teacher_name, seed_id=seed_id,
                sampling=req.params.to_dict(), finish_reason=g.finish_reason,
                rationale=rationale, parsed_answer=answer, tokens=g.num_tokens,
                **({"seed": req.meta["extra"]} if req.meta.get("extra") else {}),
            ))
        return out

    return handle


def run_labeling(
    seeds: list[Seed],
    teacher: Teacher,
    cfg: LabelingConfig,
    params: SamplingParams,
    out_dir: str | Path,
    *,
    phase: str = "labeled",
    method: str = "labeling",
    cache: ResponseCache | None = None,
    checks: list[tuple[str, RecordCheck]] = (),
    show_progress: bool = True,
) -> tuple[Path, PhaseSummary]:
    """Label ``seeds`` into ``<out_dir>/<phase>.jsonl``; resumable, see :func:`run_phase`."""
    return run_phase(
        phase, labeling_requests(seeds, cfg, params, phase), teacher,
        labeling_handler(cfg, teacher.name, method), out_dir,
        cache=cache, checks=checks, total=len(seeds), show_progress=show_progress,
    )
