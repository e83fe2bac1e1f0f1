"""Self-knowledge: the student's own answers, kept when a verifier says they are right.

The "self-knowledge" elicitation of the KD survey (arXiv 2402.13116): the student samples ``k``
answers per problem, a verifier keeps the good ones (rejection sampling), problems are filtered
by how often the student solves them (pass-rate filtering), and, as in STaR (Zelikman et al.,
2022, arXiv 2203.14465), problems the student never solves can be *rationalized*: the student
(or the teacher) is shown the reference answer as a hint and asked to explain it; the
explanation is kept only when its final answer verifies, and the hint never reaches the record.

Phases (each through :func:`~distillery.teachers.phases.run_phase`, so resumable and cached):

1. ``self_knowledge_samples``: one request per problem to ``ctx.student``, ``k`` samples. Each
   sample is a record; with ``verifier: reference`` it carries ``meta.correct`` and
   ``meta.parsed_answer`` (final answer extracted, graded by the task's grader, :mod:`distillery.answers`).
2. ``self_knowledge_verdicts`` (``verifier: teacher``): one request per sample to the teacher,
   parsed as ``Verdict: correct|incorrect``; unparsable verdicts are rejects.
3. ``self_knowledge_rationales`` (``rationalize``): one request per problem with no correct
   sample (and a reference) to the rationalizer; kept only if its final answer verifies.
4. ``self_knowledge_kept`` (deterministic assembly, written atomically): pass rates, the band,
   up to ``keep_per_problem`` distinct correct samples per problem, the rationalizations.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from distillery.answers import GradeItem, GraderOptions, build_grader
from distillery.chat import builtin, render
from distillery.config import StrictModel
from distillery.elicit.context import ElicitContext, MethodResult
from distillery.elicit.seeds import Seed, prompt_turns
from distillery.records import prompt_of, sft_record, write_jsonl_atomic
from distillery.teachers.base import (
    Generation,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Teacher,
)
from distillery.teachers.phases import MalformedOutput, Outcome, PhaseSummary, read_phase, run_phase
from distillery.teachers.replies import json_objects

METHOD = "self_knowledge"


class SelfKnowledgeConfig(StrictModel):
    """``self_knowledge:`` section of ``distillery generate`` (docs/elicitation/self_knowledge.md)."""

    k: int = Field(4, ge=1)  # student samples per problem
    temperature: float = Field(1.0, ge=0)  # > 0 when k > 1
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(512, ge=1)
    seed: int = 0
    # what the student is sent: Jinja2 text or @file; variables: prompt (+ seed extras).
    # None = the prompt as is
    template: str | None = None
    keep_instruction: bool = False  # the record's user turn is the templated prompt
    verifier: Literal["reference", "teacher"] = "reference"
    # a regex whose group "answer" (or 1) is the final answer; default: the task grader's own
    # reading (distillery.answers: \boxed{..}, "Final answer:", "The answer is N", "#N", ...)
    answer_pattern: str | None = None
    # teacher verifier: Jinja2 text or @file; variables: prompt, answer, reference (None if unknown)
    verify_template: str | None = None
    verify_with_reference: bool = True  # show the reference to the teacher verifier when known
    drop_truncated: bool = True  # a sample cut at max_new_tokens counts as wrong
    keep_per_problem: int | None = Field(1, ge=1)  # distinct correct samples kept (None = all)
    min_pass_rate: float = Field(0.0, ge=0, le=1)  # below: too hard, dropped
    max_pass_rate: float = Field(1.0, ge=0, le=1)  # above: too easy, dropped
    rationalize: bool = False  # STaR: explain the reference for problems with no correct sample
    rationalizer: Literal["student", "teacher"] = "student"
    # Jinja2 text or @file; variables: prompt, reference
    rationalize_template: str | None = None
    rationalize_samples: int = Field(1, ge=1)
    rationalize_temperature: float = Field(0.0, ge=0)  # > 0 when rationalize_samples > 1
    rationalize_max_new_tokens: int | None = Field(None, ge=1)  # None = max_new_tokens

    @model_validator(mode="after")
    def _check(self) -> SelfKnowledgeConfig:
        if self.k > 1 and self.temperature == 0:
            raise ValueError("self_knowledge: k > 1 samples need temperature > 0 "
                             "(greedy decoding gives k identical answers)")
        if self.rationalize_samples > 1 and self.rationalize_temperature == 0:
            raise ValueError("self_knowledge: rationalize_samples > 1 needs rationalize_temperature > 0")
        if self.min_pass_rate > self.max_pass_rate:
            raise ValueError(f"self_knowledge: min_pass_rate {self.min_pass_rate} is above "
                             f"max_pass_rate {self.max_pass_rate}")
        return self


# --------------------------------------------------------------------------- shared helpers


def verify_answer(text: str, reference: str, pattern: str | None = None,
                  grader: GraderOptions | None = None) -> tuple[bool, str | None]:
    """(correct, extracted answer) of ``text`` against ``reference``, graded by
    :mod:`distillery.answers` with the seeds' task grader (None: ``symbolic``, which suits
    references of any kind); ``pattern`` reads the answer instead of the grader's extractor."""
    result = build_grader(grader or "symbolic", answer_pattern=pattern).grade(GradeItem(text, str(reference)))
    return result.correct, result.answer




def clean_meta(meta: dict) -> dict:
    """A phase record's meta without the engine's bookkeeping (request_id, outputs)."""
    return {k: v for k, v in meta.items() if k not in ("request_id", "outputs")}


def student_prompt(seed: Seed, template: str | None, label: str) -> str:
    return seed.prompt if template is None else render(template, label, prompt=seed.prompt, **seed.extra)


def sample_requests(seeds: list[Seed], params: SamplingParams, template: str | None, label: str,
                    phase: str) -> Iterator[GenerationRequest]:
    """One request per seed (``params.n`` samples); meta keeps the seed and its order."""
    for index, seed in enumerate(seeds):
        yield GenerationRequest(
            f"{phase}:{seed.id}", prompt_turns(student_prompt(seed, template, label), seed.system),
            params, meta={"seed_id": seed.id, "index": index, "prompt": seed.prompt,
                          "system": seed.system, "reference": seed.reference})


def sample_handler(method: str, writer: str, keep_instruction: bool,
                   annotate: Callable[[dict, Generation], dict] | None = None) -> Callable:
    """Result -> one record per sample (``<seed>-s<j>``); ``annotate`` adds meta per sample."""

    def handle(result: GenerationResult) -> Outcome:
        req, out = result.request, Outcome()
        user = req.messages[-1]["content"] if keep_instruction else req.meta["prompt"]
        for j, g in enumerate(result.generations):
            extra = annotate(req.meta, g) if annotate else {}
            out.records.append(sft_record(
                f"{req.meta['seed_id']}-s{j}", prompt_turns(user, req.meta["system"]), g.text.strip(),
                req.meta["reference"],
                method=method, teacher=writer, seed_id=req.meta["seed_id"],
                sampling=req.params.to_dict(), index=req.meta["index"], sample=j,
                finish_reason=g.finish_reason, tokens=g.num_tokens, **extra))
        return out

    return handle


def sample_order(record: dict) -> tuple[int, int]:
    """Sort key: seed order, then sample index (whatever order the requests completed in)."""
    return record["meta"]["index"], record["meta"]["sample"]


def need_student(ctx: ElicitContext, method: str) -> Teacher:
    if ctx.student is None:
        raise ValueError(f"method {method!r} samples the student's answers: ElicitContext.student "
                         "is None (set student in the config)")
    return ctx.student


# --------------------------------------------------------------------------- verdicts

_VERDICT_WORDS = r"not\s+correct|incorrect|correct|right|wrong|yes|no|true|false|pass|fail(?:ed)?"
_VERDICT = re.compile(rf"verdict\W{{0,8}}({_VERDICT_WORDS})\b", re.IGNORECASE)
_POSITIVE = {"correct", "right", "yes", "true", "pass"}


def parse_verdict(text: str) -> bool:
    """True for "Verdict: correct", False for "Verdict: incorrect"; MalformedOutput otherwise.

    Tolerates markdown (``**Verdict:** Correct``), yes/no, true/false, pass/fail, a JSON object
    (``{"verdict": "correct"}`` or ``{"correct": true}``) and a reply that is only the word.
    """
    found = _VERDICT.findall(text)
    word = found[-1] if found else None
    if word is None:
        for obj in json_objects(text):
            value = obj.get("verdict", obj.get("correct"))
            if isinstance(value, bool):
                return value
            if isinstance(value, str):
                word = value
                break
    if word is None:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        word = re.sub(r"[^a-z ]", "", lines[-1].lower()).strip() if lines else ""
    word = " ".join(word.lower().split())
    if re.fullmatch(_VERDICT_WORDS, word):
        return word in _POSITIVE
    raise MalformedOutput(f"no verdict (correct/incorrect) in the verifier's reply: {text[:80]!r}")


# --------------------------------------------------------------------------- phases


def _sample_params(cfg: SelfKnowledgeConfig) -> SamplingParams:
    return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, n=cfg.k, seed=cfg.seed)


def _verdict_requests(samples: list[dict], cfg: SelfKnowledgeConfig, params: SamplingParams,
                      phase: str) -> Iterator[GenerationRequest]:
    template = cfg.verify_template or builtin("self_knowledge_verify")
    for s in samples:
        reference = s["reference"] if cfg.verify_with_reference else None
        text = render(template, "self_knowledge.verify_template", prompt=prompt_of(s),
                      answer=s["messages"][-1]["content"], reference=reference)
        yield GenerationRequest(f"{phase}:{s['id']}", [{"role": "user", "content": text}], params,
                                meta={"sample_id": s["id"], "seed_id": s["meta"]["seed_id"]})


def _verdict_handler(result: GenerationResult) -> Outcome:
    meta = result.request.meta
    text = result.generations[0].text
    return Outcome(records=[{"id": meta["sample_id"], "verdict": parse_verdict(text), "raw": text,
                             "meta": {"seed_id": meta["seed_id"]}}])


def _rationale_requests(todo: list[Seed], cfg: SelfKnowledgeConfig, params: SamplingParams,
                        phase: str, index: dict[str, int]) -> Iterator[GenerationRequest]:
    template = cfg.rationalize_template or builtin("self_knowledge_rationalize")
    for seed in todo:
        prompt = student_prompt(seed, cfg.template, "self_knowledge.template")
        text = render(template, "self_knowledge.rationalize_template", prompt=prompt,
                      reference=seed.reference)
        yield GenerationRequest(f"{phase}:{seed.id}", [{"role": "user", "content": text}], params,
                                meta={"seed_id": seed.id, "index": index[seed.id], "prompt": seed.prompt,
                                      "system": seed.system, "sent": prompt, "reference": seed.reference})


def _rationale_handler(cfg: SelfKnowledgeConfig, writer: str, grader: GraderOptions | None = None) -> Callable:
    def handle(result: GenerationResult) -> Outcome:
        req, out = result.request, Outcome()
        ref = req.meta["reference"]
        user = req.meta["sent"] if cfg.keep_instruction else req.meta["prompt"]
        for j, g in enumerate(result.generations):
            if cfg.drop_truncated and g.finish_reason == "length":
                out.rejects.append((f"truncated: rationalization stopped at max_new_tokens "
                                    f"({g.num_tokens} tokens)", g.text))
                continue
            ok, answer = verify_answer(g.text, ref, cfg.answer_pattern, grader)
            if not ok:
                out.rejects.append((f"rationalization_wrong: answer {answer!r} does not verify "
                                    f"against reference {ref!r}", g.text))
                continue
            out.records.append(sft_record(
                f"{req.meta['seed_id']}-r{j}", prompt_turns(user, req.meta["system"]), g.text.strip(), ref,
                method=METHOD, teacher=writer,
                seed_id=req.meta["seed_id"], sampling=req.params.to_dict(), index=req.meta["index"],
                sample=j, finish_reason=g.finish_reason, tokens=g.num_tokens, parsed_answer=answer,
                correct=True, rationalized=True))
        return out

    return handle


# --------------------------------------------------------------------------- assembly


def select(seeds: list[Seed], samples: list[dict], verdicts: dict[str, bool] | None,
           rationales: list[dict], cfg: SelfKnowledgeConfig,
           unreferenced: list[Seed] = ()) -> tuple[list[dict], list[dict], dict]:
    """Kept records, dropped rows (with reasons) and notes, from the phase records.

    ``verdicts`` (teacher verifier) maps sample id -> verdict; samples without one are unjudged
    and left out of the pass rate. With the reference verifier, ``meta.correct`` decides.
    """
    by_seed: dict[str, list[dict]] = {}
    for s in sorted(samples, key=sample_order):
        by_seed.setdefault(s["meta"]["seed_id"], []).append(s)
    rats: dict[str, list[dict]] = {}
    for r in sorted(rationales, key=sample_order):
        rats.setdefault(r["meta"]["seed_id"], []).append(r)
    kept, dropped, rates = [], [], []
    reasons: Counter[str] = Counter()
    n_rationalized = problems_kept = 0
    verifier = cfg.verifier

    def drop(seed: Seed, reason: str, **meta: object) -> None:
        reasons[reason.split(":")[0]] += 1
        dropped.append({"id": f"{seed.id}-dropped", "reason": reason, "raw": "",
                        "meta": {"method": METHOD, "seed_id": seed.id, "verifier": verifier, **meta}})

    for seed in unreferenced:
        drop(seed, "no_reference: the reference verifier needs the seed's reference answer")
    for seed in seeds:
        group = by_seed.get(seed.id)
        if not group:
            continue  # the student could not answer (a teacher error, in the samples rejects)
        judged = [(s, s["meta"]["correct"] if verdicts is None else verdicts[s["id"]])
                  for s in group if verdicts is None or s["id"] in verdicts]
        if not judged:
            drop(seed, "unjudged: the verifier gave no usable verdict on any sample", samples=len(group))
            continue
        correct = [s for s, ok in judged if ok]
        rate = len(correct) / len(judged)
        rates.append(rate)
        stats = {"pass_rate": rate, "judged": len(judged), "correct_samples": len(correct)}
        if correct and not cfg.min_pass_rate <= rate <= cfg.max_pass_rate:
            side = "too_easy" if rate > cfg.max_pass_rate else "too_hard"
            drop(seed, f"{side}: pass rate {rate:.3g} outside [{cfg.min_pass_rate}, "
                       f"{cfg.max_pass_rate}]", **stats)
            continue
        chosen = _distinct(correct, cfg.keep_per_problem)
        rationalized = False
        if not chosen:
            chosen = _distinct(rats.get(seed.id, []), cfg.keep_per_problem)
            rationalized = bool(chosen)
            if not chosen:
                why = ("no rationalization verified" if cfg.rationalize and seed.reference is not None
                       else "rationalization is off" if not cfg.rationalize else "no reference to rationalize")
                drop(seed, f"no_correct_sample: {why}", **stats)
                continue
        problems_kept += 1
        n_rationalized += len(chosen) if rationalized else 0
        for rec in chosen:
            meta = {**clean_meta(rec["meta"]), **stats, "verifier": verifier, "rationalized": rationalized}
            meta["method"] = METHOD
            kept.append({**rec, "meta": meta})
    notes = {"problems": len(seeds) + len(unreferenced), "problems_judged": len(rates),
             "problems_kept": problems_kept, "records": len(kept), "rationalized": n_rationalized,
             "pass_rate_mean": round(sum(rates) / len(rates), 4) if rates else None,
             "dropped": dict(sorted(reasons.items()))}
    return kept, dropped, notes


def _distinct(records: list[dict], limit: int | None) -> list[dict]:
    seen, out = set(), []
    for r in records:
        text = " ".join(r["messages"][-1]["content"].split())
        if text and text not in seen:
            seen.add(text)
            out.append(r)
    return out if limit is None else out[:limit]


# --------------------------------------------------------------------------- the method


def run_self_knowledge(ctx: ElicitContext, cfg: SelfKnowledgeConfig) -> MethodResult:
    """Sample the student, verify, filter by pass rate, rationalize; see the module docstring."""
    student = need_student(ctx, METHOD)
    work = Path(ctx.work_dir)
    phases: list[PhaseSummary] = []
    common = {"cache": ctx.cache, "show_progress": ctx.show_progress}
    if cfg.verifier == "reference":
        seeds = [s for s in ctx.seeds if s.reference is not None]
        unreferenced = [s for s in ctx.seeds if s.reference is None]
    else:
        seeds, unreferenced = list(ctx.seeds), []
    index = {s.id: i for i, s in enumerate(seeds)}

    grader = build_grader(ctx.grader or "symbolic", answer_pattern=cfg.answer_pattern)

    def annotate(meta: dict, g: Generation) -> dict:
        truncated = cfg.drop_truncated and g.finish_reason == "length"
        result = grader.grade(GradeItem(g.text, str(meta["reference"] or "")))
        out = {"parsed_answer": result.answer, "verifier": cfg.verifier}
        if cfg.verifier == "reference":
            out["correct"] = not truncated and result.correct
        return out

    phase = f"{METHOD}_samples"
    path, summary = run_phase(
        phase, sample_requests(seeds, _sample_params(cfg), cfg.template, "self_knowledge.template", phase),
        student, sample_handler(METHOD, student.name, cfg.keep_instruction, annotate), work,
        total=len(seeds), **common)
    phases.append(summary)
    samples = read_phase(path, sample_order)

    verdicts = None
    if cfg.verifier == "teacher":
        phase = f"{METHOD}_verdicts"
        judge = [s for s in samples
                 if not (cfg.drop_truncated and s["meta"]["finish_reason"] == "length")]
        vpath, summary = run_phase(
            phase, _verdict_requests(judge, cfg, replace(ctx.params, n=1), phase), ctx.teacher,
            _verdict_handler, work, total=len(judge), **common)
        phases.append(summary)
        verdicts = {v["id"]: v["verdict"] for v in read_phase(vpath)}
        truncated = {s["id"] for s in samples} - {s["id"] for s in judge}
        verdicts.update(dict.fromkeys(truncated, False))

    rationales: list[dict] = []
    if cfg.rationalize:
        solved = {s["meta"]["seed_id"] for s in samples
                  if (s["meta"].get("correct") if verdicts is None else verdicts.get(s["id"]))}
        todo = [s for s in seeds if s.id not in solved and s.reference is not None]
        writer = student if cfg.rationalizer == "student" else ctx.teacher
        params = SamplingParams(max_new_tokens=cfg.rationalize_max_new_tokens or cfg.max_new_tokens,
                                temperature=cfg.rationalize_temperature, top_p=cfg.top_p,
                                n=cfg.rationalize_samples, seed=cfg.seed)
        phase = f"{METHOD}_rationales"
        rpath, summary = run_phase(
            phase, _rationale_requests(todo, cfg, params, phase, index), writer,
            _rationale_handler(cfg, writer.name, ctx.grader), work, total=len(todo), **common)
        phases.append(summary)
        rationales = read_phase(rpath)

    kept, dropped, notes = select(seeds, samples, verdicts, rationales, cfg, unreferenced)
    phase = f"{METHOD}_kept"
    out = write_jsonl_atomic(work / f"{phase}.jsonl", kept)
    write_jsonl_atomic(work / f"{phase}.rejects.jsonl", dropped)
    phases.append(PhaseSummary(phase, records=len(kept), rejects=len(dropped),
                               reject_reasons=dict(notes["dropped"])))
    return MethodResult(records=out, phases=phases, notes=notes)
