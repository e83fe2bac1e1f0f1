"""Feedback: the teacher grades the student's answers, corrects the bad ones, ranks them.

The "feedback" elicitation of the KD survey (arXiv 2402.13116): instead of writing answers,
the teacher judges what the *student* writes. Its grades become preference records
(``prompt/chosen/rejected``, for ranking optimization such as DPO) and its corrections of
low-scored answers become SFT records.

Phases (each through :func:`~distillery.teachers.phases.run_phase`, so resumable and cached):

1. ``feedback_samples``: one request per prompt to ``ctx.student``, ``samples_per_prompt``
   answers sampled at ``student_temperature``.
2. ``feedback_grades``: one request per student answer to the teacher, through the grading
   template; the reply is parsed by :func:`parse_grade` into a score on ``1..max_score`` and a
   rationale. Unparsable or out-of-range grades are rejects (reason ``malformed``).
3. ``feedback_corrections`` (``correct_below`` set): one request per answer scored below it;
   the teacher's corrected answer is an SFT record (method ``feedback``) whose meta keeps the
   student's answer, its score and the grader's rationale.
4. ``feedback_pairs`` (deterministic assembly, written atomically): per prompt, the best vs the
   worst answer (or every pair) whose scores differ by at least ``min_margin``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from distillery.chat import builtin, render
from distillery.config import StrictModel
from distillery.elicit.context import ElicitContext, MethodResult
from distillery.elicit.seeds import prompt_turns
from distillery.elicit.self_knowledge import (
    clean_meta,
    need_student,
    read_phase,
    sample_handler,
    sample_order,
    sample_requests,
)
from distillery.records import prompt_of, sft_record, write_jsonl_atomic
from distillery.teachers.base import GenerationRequest, GenerationResult, SamplingParams
from distillery.teachers.phases import MalformedOutput, Outcome, PhaseSummary, run_phase
from distillery.teachers.replies import parse_grade

METHOD = "feedback"


class FeedbackConfig(StrictModel):
    """``feedback:`` section of ``distillery generate`` (see docs/elicitation/feedback.md)."""

    samples_per_prompt: int = Field(4, ge=1)  # student answers per prompt
    student_temperature: float = Field(1.0, ge=0)  # > 0 when samples_per_prompt > 1
    student_top_p: float = Field(1.0, gt=0, le=1)
    student_max_new_tokens: int = Field(512, ge=1)
    seed: int = 0
    # what the student is sent: Jinja2 text or @file; variables: prompt (+ seed extras);
    # None = the prompt as is
    student_template: str | None = None
    # Jinja2 text or @file; variables: prompt, answer, reference (None if hidden), max_score
    grade_template: str | None = None
    max_score: int = Field(10, ge=2)  # scores run 1..max_score
    use_reference: bool = True  # show the seed's reference answer to the grader when it has one
    correct_below: float | None = None  # answers scored below this are corrected by the teacher
    # Jinja2 text or @file; variables: prompt, answer, score, rationale, reference, max_score
    correct_template: str | None = None
    drop_truncated: bool = True  # a correction cut at max_new_tokens is a reject
    min_margin: float = Field(1.0, gt=0)  # best - worst score needed for a pair
    pairs: Literal["best_worst", "all"] = "best_worst"
    # when every answer of a prompt scored below correct_below: chosen = the teacher's correction
    chosen_from_correction: bool = False

    @model_validator(mode="after")
    def _check(self) -> FeedbackConfig:
        if self.samples_per_prompt > 1 and self.student_temperature == 0:
            raise ValueError("feedback: samples_per_prompt > 1 needs student_temperature > 0 "
                             "(greedy decoding gives identical answers)")
        if self.chosen_from_correction and self.correct_below is None:
            raise ValueError("feedback: chosen_from_correction needs correct_below (which answers "
                             "the teacher corrects)")
        return self


# --------------------------------------------------------------------------- phases


def _grade_requests(samples: list[dict], cfg: FeedbackConfig, params: SamplingParams,
                    phase: str):  # noqa: ANN202
    template = cfg.grade_template or builtin("feedback_grade")
    for s in samples:
        reference = s["reference"] if cfg.use_reference else None
        text = render(template, "feedback.grade_template", prompt=prompt_of(s),
                      answer=s["messages"][-1]["content"], reference=reference, max_score=cfg.max_score)
        yield GenerationRequest(f"{phase}:{s['id']}", [{"role": "user", "content": text}], params,
                                meta={"sample_id": s["id"], "seed_id": s["meta"]["seed_id"],
                                      "index": s["meta"]["index"], "sample": s["meta"]["sample"]})


def _grade_handler(max_score: int, judge: str):  # noqa: ANN202
    def handle(result: GenerationResult) -> Outcome:
        meta = result.request.meta
        score, rationale = parse_grade(result.generations[0].text, max_score)
        return Outcome(records=[{
            "id": meta["sample_id"], "score": score, "rationale": rationale,
            "meta": {"seed_id": meta["seed_id"], "index": meta["index"], "sample": meta["sample"],
                     "judge": judge, "scores": {"judge": score}},
        }])

    return handle


def _correction_requests(graded: list[dict], cfg: FeedbackConfig, params: SamplingParams,
                         phase: str):  # noqa: ANN202
    template = cfg.correct_template or builtin("feedback_correct")
    for g in graded:
        if g["score"] >= cfg.correct_below:
            continue
        reference = g["reference"] if cfg.use_reference else None
        text = render(template, "feedback.correct_template", prompt=g["prompt"], answer=g["answer"],
                      score=g["score"], rationale=g["rationale"], reference=reference,
                      max_score=cfg.max_score)
        yield GenerationRequest(f"{phase}:{g['id']}", [{"role": "user", "content": text}], params,
                                meta={**{k: g[k] for k in ("id", "seed_id", "index", "sample", "prompt",
                                                           "answer", "score", "rationale", "reference")},
                                      "system": g.get("system")})


def _correction_handler(cfg: FeedbackConfig, teacher: str):  # noqa: ANN202
    def handle(result: GenerationResult) -> Outcome:
        m, g = result.request.meta, result.generations[0]
        if cfg.drop_truncated and g.finish_reason == "length":
            return Outcome(rejects=[(f"truncated: correction stopped at max_new_tokens "
                                     f"({g.num_tokens} tokens)", g.text)])
        if not g.text.strip():
            raise MalformedOutput("empty correction")
        return Outcome(records=[sft_record(
            f"{m['seed_id']}-c{m['sample']}", prompt_turns(m["prompt"], m["system"]), g.text.strip(),
            m["reference"],
            method=METHOD, teacher=teacher, seed_id=m["seed_id"], sampling=result.request.params.to_dict(),
            index=m["index"], sample=m["sample"], corrects=m["id"], student_answer=m["answer"],
            student_score=m["score"], rationale=m["rationale"], finish_reason=g.finish_reason,
            tokens=g.num_tokens)])

    return handle


# --------------------------------------------------------------------------- assembly


def join_grades(samples: list[dict], grades: list[dict]) -> list[dict]:
    """Graded answers: a flat dict per student answer that has a grade, in sample order."""
    by_id = {g["id"]: g for g in grades}
    out = []
    for s in sorted(samples, key=sample_order):
        g = by_id.get(s["id"])
        if g is None:
            continue
        out.append({"id": s["id"], "seed_id": s["meta"]["seed_id"], "index": s["meta"]["index"],
                    "sample": s["meta"]["sample"], "prompt": prompt_of(s),
                    # a task's system prompt, which the records made from this answer keep
                    "system": next((m["content"] for m in s["messages"] if m["role"] == "system"), None),
                    "answer": s["messages"][-1]["content"], "reference": s.get("reference"),
                    "score": g["score"], "rationale": g["rationale"], "judge": g["meta"]["judge"],
                    "student": s["meta"].get("teacher"), "created": s["meta"].get("created")})
    return out


def _norm(text: str) -> str:
    return " ".join(text.split())


def _pair(chosen: dict, rejected: dict, correction: dict | None = None) -> dict:
    seed = rejected["seed_id"]
    c_text = correction["messages"][-1]["content"] if correction else chosen["answer"]
    c_tag = f"c{rejected['sample']}" if correction else f"s{chosen['sample']}"
    scores = {"judge_rejected": rejected["score"]}
    if not correction:
        scores = {"judge": chosen["score"], **scores}
    return {
        "id": f"{seed}-{c_tag}-s{rejected['sample']}",
        "prompt": prompt_turns(rejected["prompt"], rejected.get("system")),
        "chosen": [{"role": "assistant", "content": c_text}],
        "rejected": [{"role": "assistant", "content": rejected["answer"]}],
        "reference": rejected.get("reference"),
        "meta": {
            "method": METHOD, "teacher": rejected.get("judge"), "student": rejected.get("student"),
            "seed_id": seed, "scores": scores,
            "margin": None if correction else chosen["score"] - rejected["score"],
            "chosen_source": "correction" if correction else "student",
            "chosen_sample": correction["id"] if correction else chosen["id"],
            "rejected_sample": rejected["id"],
            "rationale_chosen": None if correction else chosen["rationale"],
            "rationale_rejected": rejected["rationale"],
            "created": max(x for x in (chosen.get("created"), rejected.get("created"), "") if x is not None),
        },
    }


def assemble_preferences(graded: list[dict], cfg: FeedbackConfig,
                         corrections: dict[str, dict] | None = None) -> tuple[list[dict], list[dict], dict]:
    """Preference records, dropped prompts (with reasons) and notes from graded answers.

    ``graded``: dicts with id, seed_id, index, sample, prompt, answer, score, rationale (see
    :func:`join_grades`). ``corrections``: student answer id -> correction record. Best is the
    highest score, worst the lowest; ties go to the lower sample index. Pairs of identical texts
    are never made.
    """
    corrections = corrections or {}
    groups: dict[str, list[dict]] = {}
    for g in sorted(graded, key=lambda g: (g["index"], g["sample"])):
        groups.setdefault(g["seed_id"], []).append(g)
    prefs, dropped = [], []
    reasons: Counter[str] = Counter()
    for seed, group in groups.items():
        best_first = sorted(group, key=lambda g: (-g["score"], g["sample"]))
        worst_first = sorted(group, key=lambda g: (g["score"], g["sample"]))
        made: list[dict] = []
        if cfg.chosen_from_correction and all(g["score"] < cfg.correct_below for g in group):
            fixable = [g for g in worst_first if g["id"] in corrections]
            if cfg.pairs == "best_worst":
                fixable = fixable[:1]
            made = [_pair(g, g, corrections[g["id"]]) for g in fixable
                    if _norm(corrections[g["id"]]["messages"][-1]["content"]) != _norm(g["answer"])]
            why = "no_correction: every answer is below correct_below and none was corrected"
        elif cfg.pairs == "best_worst":
            best, worst = best_first[0], worst_first[0]
            margin = best["score"] - worst["score"]
            if len(group) < 2:
                why = "single_answer: one graded answer, nothing to compare"
            elif margin < cfg.min_margin:
                why = f"margin: best {best['score']} - worst {worst['score']} < min_margin {cfg.min_margin}"
            elif _norm(best["answer"]) == _norm(worst["answer"]):
                why = "identical: best and worst answers have the same text"
            else:
                made = [_pair(best, worst)]
        else:
            seen = set()
            for a in best_first:
                for b in worst_first:
                    key = (_norm(a["answer"]), _norm(b["answer"]))
                    if a["score"] - b["score"] >= cfg.min_margin and key[0] != key[1] and key not in seen:
                        seen.add(key)
                        made.append(_pair(a, b))
            why = ("single_answer: one graded answer, nothing to compare" if len(group) < 2 else
                   f"margin: no two distinct answers differ by min_margin {cfg.min_margin}")
        if made:
            prefs.extend(made)
        else:
            reasons[why.split(":")[0]] += 1
            dropped.append({"id": f"{seed}-nopair", "reason": why, "raw": "",
                            "meta": {"method": METHOD, "seed_id": seed,
                                     "scores": [g["score"] for g in group]}})
    hist = Counter(g["score"] for g in graded)
    notes = {
        "graded": len(graded),
        "score_histogram": {str(k): hist[k] for k in sorted(hist)},
        "mean_score": round(sum(g["score"] for g in graded) / len(graded), 4) if graded else None,
        "prompts_graded": len(groups), "prompts_with_pairs": len(groups) - len(dropped),
        "pairs": len(prefs), "corrections": len(corrections), "dropped": dict(sorted(reasons.items())),
    }
    return prefs, dropped, notes


# --------------------------------------------------------------------------- the method


def run_feedback(ctx: ElicitContext, cfg: FeedbackConfig) -> MethodResult:
    """Sample the student, grade, correct, pair; see the module docstring."""
    student = need_student(ctx, METHOD)
    work = Path(ctx.work_dir)
    common = {"cache": ctx.cache, "show_progress": ctx.show_progress}
    phases: list[PhaseSummary] = []
    seeds = list(ctx.seeds)
    teacher_params = replace(ctx.params, n=1)

    phase = f"{METHOD}_samples"
    params = SamplingParams(max_new_tokens=cfg.student_max_new_tokens, temperature=cfg.student_temperature,
                            top_p=cfg.student_top_p, n=cfg.samples_per_prompt, seed=cfg.seed)
    path, summary = run_phase(
        phase, sample_requests(seeds, params, cfg.student_template, "feedback.student_template", phase),
        student, sample_handler(METHOD, student.name, keep_instruction=False), work,
        total=len(seeds), **common)
    phases.append(summary)
    samples = read_phase(path, sample_order)

    phase = f"{METHOD}_grades"
    gpath, summary = run_phase(
        phase, _grade_requests(samples, cfg, teacher_params, phase), ctx.teacher,
        _grade_handler(cfg.max_score, ctx.teacher.name), work, total=len(samples), **common)
    phases.append(summary)
    graded = join_grades(samples, read_phase(gpath))

    records, corrections = None, {}
    if cfg.correct_below is not None:
        phase = f"{METHOD}_corrections"
        todo = sum(g["score"] < cfg.correct_below for g in graded)
        records, summary = run_phase(
            phase, _correction_requests(graded, cfg, teacher_params, phase), ctx.teacher,
            _correction_handler(cfg, ctx.teacher.name), work, total=todo, **common)
        phases.append(summary)
        corrections = {c["meta"]["corrects"]: {**c, "meta": clean_meta(c["meta"])}
                       for c in read_phase(records)}

    prefs, dropped, notes = assemble_preferences(graded, cfg, corrections)
    phase = f"{METHOD}_pairs"
    out = write_jsonl_atomic(work / f"{phase}.jsonl", prefs)
    write_jsonl_atomic(work / f"{phase}.rejects.jsonl", dropped)
    phases.append(PhaseSummary(phase, records=len(prefs), rejects=len(dropped),
                               reject_reasons=dict(notes["dropped"])))
    notes["samples"] = len(samples)
    notes["ungraded"] = len(samples) - len(graded)
    return MethodResult(records=records, preferences=out, phases=phases, notes=notes)
