"""Curation: topic-driven generation of tasks, balanced across a taxonomy, then labeled.

The user gives a taxonomy (topics, optionally with subtopics). Following the data-curation
methods of the KD survey (arXiv 2402.13116, e.g. UltraChat's topics → subtopics → questions and
Phi's "textbook" topic lists):

1. ``curate_subtopics`` (only for topics given without subtopics): one request per topic asks
   for ``subtopics_per_topic`` subtopics as a list; parsed, deduplicated, capped. A topic whose
   reply has no usable subtopic falls back to the topic itself as its one subtopic.
2. ``curate_tasks``: one request per (topic, subtopic) asks for ``tasks_per_subtopic`` tasks as
   a numbered list, sampled once (``n`` = 1); the list is parsed into tasks.
3. exact + near-duplicate removal over all tasks (``ElicitContext.dedup_texts``), in request
   order, so the same phase files always give the same tasks.
4. balance: every topic keeps the same number of tasks (the smallest non-empty topic's count,
   or ``tasks_per_topic`` if lower), spread evenly over its subtopics, chosen with a seeded RNG.
5. the kept tasks (``curation_tasks.jsonl``, a seed file with topic/subtopic) are labeled.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from pydantic import Field, field_validator

from distillery.chat import builtin, render
from distillery.config import StrictModel
from distillery.elicit.context import ElicitContext, MethodResult
from distillery.elicit.expansion import (
    check_candidate,
    dedup_new,
    generation_params,
    parse_list,
    request_order,
    write_seed_file,
)
from distillery.elicit.seeds import Seed, seed_id
from distillery.records import read_jsonl, write_jsonl_atomic
from distillery.teachers.base import GenerationRequest, GenerationResult, SamplingParams
from distillery.teachers.phases import MalformedOutput, Outcome, PhaseSummary, run_phase


class CurationConfig(StrictModel):
    """``curation:`` section of ``distillery generate`` (see docs/elicitation/curation.md)."""

    # topic -> subtopics ([] = ask the teacher), or a list of topics (all asked)
    taxonomy: dict[str, list[str]] | list[str] = Field(min_length=1)
    subtopics_per_topic: int = Field(5, ge=1)  # asked for, and the cap, when the teacher fills them
    tasks_per_subtopic: int = Field(5, ge=1)  # asked for per request, and the cap per request
    tasks_per_topic: int | None = Field(None, ge=1)  # balance target (None: smallest topic's count)
    balance: bool = True  # equal counts per topic (and even per subtopic)
    subtopic_template: str | None = None  # Jinja2 text or @file; variables: topic, num
    task_template: str | None = None  # Jinja2 text or @file; variables: topic, subtopic, num
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(1024, ge=1)
    max_chars: int = Field(2000, ge=1)  # longer tasks are rejected
    drop_truncated: bool = False  # True: a list cut off at max_new_tokens is rejected whole
    label: bool = True  # label the tasks with the teacher at the end
    seed: int = 0  # drives the balancing choice

    @field_validator("taxonomy")
    @classmethod
    def _normalize(cls, value: dict[str, list[str]] | list[str]) -> dict[str, list[str]]:
        topics = dict.fromkeys(value, None) if isinstance(value, list) else value
        out: dict[str, list[str]] = {}
        for topic, subs in topics.items():
            if not str(topic).strip():
                raise ValueError("curation.taxonomy: empty topic name")
            if topic in out:
                raise ValueError(f"curation.taxonomy: topic {topic!r} given twice")
            out[topic] = list(dict.fromkeys(s.strip() for s in subs or [] if s.strip()))
        return out


# --------------------------------------------------------------------------- phases


def _params(ctx: ElicitContext, cfg: CurationConfig, offset: int) -> SamplingParams:
    return generation_params(ctx, cfg.temperature, cfg.top_p, cfg.max_new_tokens, offset)


def _truncated(cfg: CurationConfig, result: GenerationResult) -> Outcome | None:
    g = result.generations[0]
    if cfg.drop_truncated and g.finish_reason == "length":
        return Outcome(rejects=[(f"truncated: stopped at max_new_tokens ({g.num_tokens} tokens)", g.text)])
    return None


def subtopic_requests(cfg: CurationConfig, params: SamplingParams) -> list[GenerationRequest]:
    template = cfg.subtopic_template or builtin("curation_subtopics")
    return [GenerationRequest(
        f"curate_subtopics:{seed_id(topic)}",
        [{"role": "user", "content": render(template, "curation.subtopic_template", topic=topic,
                                            num=cfg.subtopics_per_topic)}],
        params, meta={"index": i, "topic": topic})
        for i, topic in enumerate(t for t, subs in cfg.taxonomy.items() if not subs)]


def subtopic_handler(cfg: CurationConfig):  # noqa: ANN201
    """Result -> one record with the topic's parsed subtopics (deduped, capped)."""

    def handle(result: GenerationResult) -> Outcome:
        if (out := _truncated(cfg, result)) is not None:
            return out
        topic, text = result.request.meta["topic"], result.generations[0].text
        items = [s for s in parse_list(text) if s.casefold() != topic.casefold()
                 and len(s) <= cfg.max_chars]
        if not items:
            raise MalformedOutput("no subtopics in the teacher's text")
        out = Outcome(records=[{"id": seed_id(topic), "topic": topic,
                                "subtopics": items[: cfg.subtopics_per_topic],
                                "meta": {"index": result.request.meta["index"]}}])
        out.rejects += [("extra: more subtopics than subtopics_per_topic", s)
                        for s in items[cfg.subtopics_per_topic:]]
        return out

    return handle


def task_requests(cfg: CurationConfig, taxonomy: dict[str, list[str]],
                  params: SamplingParams) -> list[GenerationRequest]:
    template = cfg.task_template or builtin("curation_tasks")
    reqs = []
    for topic, subs in taxonomy.items():
        for sub in subs:
            user = render(template, "curation.task_template", topic=topic, subtopic=sub,
                          num=cfg.tasks_per_subtopic)
            reqs.append(GenerationRequest(
                f"curate_tasks:{seed_id(topic + chr(0) + sub)}", [{"role": "user", "content": user}],
                params, meta={"index": len(reqs), "topic": topic, "subtopic": sub}))
    return reqs


def task_handler(cfg: CurationConfig, teacher_name: str):  # noqa: ANN201
    """Result -> one record per parsed task (``id``, ``prompt``, topic/subtopic in ``meta``)."""

    def handle(result: GenerationResult) -> Outcome:
        if (out := _truncated(cfg, result)) is not None:
            return out
        req, g = result.request, result.generations[0]
        items = parse_list(g.text)
        if not items:
            raise MalformedOutput("no tasks in the teacher's text")
        out = Outcome()
        sources = [req.meta["topic"], req.meta["subtopic"]]
        for j, item in enumerate(items):
            if j >= cfg.tasks_per_subtopic:
                out.rejects.append(("extra: more tasks than tasks_per_subtopic", item))
            elif (reason := check_candidate(item, req.messages[-1]["content"], sources,
                                            cfg.max_chars)) is not None:
                out.rejects.append((reason, item))
            else:
                out.records.append({"id": seed_id(item), "prompt": item, "meta": {
                    "index": req.meta["index"], "item": j, "topic": req.meta["topic"],
                    "subtopic": req.meta["subtopic"], "teacher": teacher_name,
                    "finish_reason": g.finish_reason}})
        return out

    return handle


# --------------------------------------------------------------------------- balance


def balance(tasks: list[Seed], topics: list[str], target: int | None, rng_seed: int = 0,
            equalize: bool = True) -> tuple[list[Seed], list[Seed], int | None]:
    """Keep the same number of tasks in every topic that has any, spread evenly over subtopics.

    The count is the smallest non-empty topic's (or ``target`` when lower); without
    ``equalize`` every topic keeps up to ``target`` (all when None). Within a topic the
    subtopics take turns (in a seeded order), each giving a seeded-random task of its own until
    the count is reached, so subtopic counts differ by at most one unless a subtopic runs out.
    Returns (kept in input order, dropped, the count).
    """
    by_topic: dict[str, dict[str, list[Seed]]] = {t: {} for t in topics}
    for s in tasks:
        by_topic.setdefault(s.extra["topic"], {}).setdefault(s.extra["subtopic"], []).append(s)
    sizes = [sum(map(len, subs.values())) for subs in by_topic.values()]
    count = min([n for n in sizes if n] or [0]) if equalize else None
    if target is not None:
        count = target if count is None else min(count, target)
    chosen: set[int] = set()
    for (topic, subs), size in zip(by_topic.items(), sizes):
        quota = size if count is None else min(count, size)
        rng = random.Random(f"curation:{rng_seed}:{topic}")
        queues = {sub: rng.sample(items, len(items)) for sub, items in sorted(subs.items())}
        order = sorted(queues)
        rng.shuffle(order)
        taken = 0
        while taken < quota:
            for sub in order:
                if queues[sub] and taken < quota:
                    chosen.add(id(queues[sub].pop()))
                    taken += 1
    kept = [s for s in tasks if id(s) in chosen]
    return kept, [s for s in tasks if id(s) not in chosen], count


# --------------------------------------------------------------------------- the method


def run_curation(ctx: ElicitContext, cfg: CurationConfig) -> MethodResult:
    """Taxonomy → subtopics → tasks → dedup → balance → labels (see the module doc)."""
    work = Path(ctx.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    taxonomy = {t: list(subs) for t, subs in cfg.taxonomy.items()}
    phases: list[PhaseSummary] = []
    notes: dict = {}
    if any(not subs for subs in taxonomy.values()):
        reqs = subtopic_requests(cfg, _params(ctx, cfg, 0))
        path, summary = run_phase("curate_subtopics", reqs, ctx.teacher, subtopic_handler(cfg), work,
                                  cache=ctx.cache, total=len(reqs), show_progress=ctx.show_progress)
        phases.append(summary)
        for row in sorted(read_jsonl(path), key=request_order):
            taxonomy[row["topic"]] = row["subtopics"]
        fallback = [t for t, subs in taxonomy.items() if not subs]
        for topic in fallback:
            taxonomy[topic] = [topic]
        notes["subtopic_fallback"] = fallback
    (work / "curation_taxonomy.json").write_text(json.dumps(taxonomy, indent=2, ensure_ascii=False))

    reqs = task_requests(cfg, taxonomy, _params(ctx, cfg, 1))
    path, summary = run_phase("curate_tasks", reqs, ctx.teacher, task_handler(cfg, ctx.teacher.name),
                              work, cache=ctx.cache, total=len(reqs), show_progress=ctx.show_progress)
    phases.append(summary)
    tasks = [Seed(r["id"], r["prompt"], None, {"topic": r["meta"]["topic"],
                                                "subtopic": r["meta"]["subtopic"]})
             for r in sorted(read_jsonl(path), key=request_order)]
    unique, dropped = dedup_new(ctx, [], tasks)
    before = Counter(s.extra["topic"] for s in unique)
    kept, cut, count = balance(unique, list(taxonomy), cfg.tasks_per_topic, cfg.seed, cfg.balance)
    dropped += [{"id": s.id, "prompt": s.prompt, "reason": f"balance: topic capped at {count}",
                 **s.extra} for s in cut]
    after = Counter(s.extra["topic"] for s in kept)
    out = write_seed_file(work / "curation_tasks.jsonl", kept)
    write_jsonl_atomic(work / "curation_dropped.jsonl", dropped)
    notes.update({
        "taxonomy": taxonomy,
        "tasks_parsed": len(tasks),
        "duplicates_removed": len(tasks) - len(unique),
        "per_topic_before": {t: before.get(t, 0) for t in taxonomy},
        "per_topic_after": {t: after.get(t, 0) for t in taxonomy},
        "per_subtopic_after": {f"{t}/{s}": n for (t, s), n in sorted(
            Counter((x.extra["topic"], x.extra["subtopic"]) for x in kept).items())},
        "empty_topics": [t for t in taxonomy if not before.get(t)],
        "tasks": len(kept),
        "tasks_file": str(out),
    })
    records = None
    if cfg.label:
        records, summary = ctx.label(kept, "curation_labeled", "curation")
        phases.append(summary)
    return MethodResult(records=records, phases=phases, notes=notes)
