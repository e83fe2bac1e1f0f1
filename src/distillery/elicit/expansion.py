"""Expansion: grow a seed set into new, deduplicated instructions, then label them.

Two strategies from the literature:

- ``self_instruct`` (Wang et al. 2023, "Self-Instruct: Aligning Language Models with
  Self-Generated Instructions", arXiv 2212.10560): the teacher sees ``examples_per_prompt``
  instructions drawn from the pool (seeds + instructions made so far) and writes a new one.
- ``evol_instruct`` (Xu et al. 2023, "WizardLM: Empowering Large Language Models to Follow
  Complex Instructions", arXiv 2304.12244): the teacher rewrites an instruction of the previous
  round with one *evolution* (add constraints, deepen, concretize, increase reasoning steps,
  breadth); each evolution is its own template.

Each round is one resumable phase (``expand_r<k>``); its handler turns the teacher's text into
one candidate instruction (:func:`parse_instruction`) or a reject with the reason. The
candidates are then deduplicated (exact + MinHash, :meth:`ElicitContext.dedup_texts`) against
the pool and among themselves, in request order, so the same phase files always give the same
pool: a restarted run rebuilds the pool from the finished phases and asks the teacher only for
what is missing. The new instructions of a round, with their provenance, are written as a seed
file (``expand_r<k>.seeds.jsonl``, loadable with ``seeds.path``); at the end they are labeled
by the teacher (``expansion_labeled.jsonl``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from distillery.chat import builtin, render
from distillery.config import StrictModel
from distillery.elicit.context import ElicitContext, MethodResult
from distillery.elicit.seeds import Seed, seed_id
from distillery.records import read_jsonl, write_jsonl_atomic
from distillery.teachers.base import GenerationRequest, GenerationResult, SamplingParams
from distillery.teachers.phases import MalformedOutput, Outcome, PhaseSummary, run_phase

EVOLUTIONS = ("add_constraints", "deepen", "concretize", "increase_reasoning", "breadth")


class ExpansionConfig(StrictModel):
    """``expansion:`` section of ``distillery generate`` (see docs/elicitation/expansion.md)."""

    strategy: Literal["self_instruct", "evol_instruct"] = "self_instruct"
    rounds: int = Field(1, ge=1)
    per_round: int = Field(16, ge=1)  # requests (= candidate instructions) per round
    examples_per_prompt: int = Field(3, ge=1)  # self_instruct: pool examples shown per request
    # evol_instruct: operations drawn (seeded) per request; a name without a built-in template
    # needs one in evolution_templates
    evolutions: list[str] = Field(default_factory=lambda: list(EVOLUTIONS), min_length=1)
    self_instruct_template: str | None = None  # Jinja2 text or @file; variables: examples
    evolution_templates: dict[str, str] = Field(default_factory=dict)  # op -> text or @file
    temperature: float = Field(0.9, ge=0)  # > 0 so that requests give different instructions
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    max_chars: int = Field(2000, ge=1)  # longer instructions are rejected
    drop_truncated: bool = True  # an instruction cut off at max_new_tokens is rejected
    label: bool = True  # label the new instructions with the teacher at the end
    include_seeds: bool = True  # label the seed prompts too
    seed: int = 0  # drives the choice of examples, parents and evolutions

    @model_validator(mode="after")
    def _check(self) -> ExpansionConfig:
        if self.strategy == "evol_instruct":
            missing = [op for op in self.evolutions
                       if op not in EVOLUTIONS and op not in self.evolution_templates]
            if missing:
                raise ValueError(f"expansion.evolutions {missing} have no built-in template "
                                 f"({', '.join(EVOLUTIONS)}): give them in evolution_templates")
        return self

    def template(self, op: str | None) -> str:
        if op is None:
            return self.self_instruct_template or builtin("expansion_self_instruct")
        return self.evolution_templates.get(op) or builtin(f"expansion_{op}")


# --------------------------------------------------------------------------- parsing teacher text

_LABEL = re.compile(
    r"^\s*(?:#+\s*)?(?:\*\*)?\s*(?:(?:new|rewritten|created|evolved|generated)\s+)?"
    r"(?:task|instruction|prompt|problem|question|subtopic)(?:\s*\d{1,3})?\s*(?:#+)?\s*(?:\*\*)?"
    r"\s*[:：]\s*(?:\*\*)?", re.IGNORECASE)
_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}\s*[.):\]]|[-*•+–])(?:\s+|$)")
_ITEM_START = re.compile(
    _MARKER.pattern + "|" + r"^\s*(?:#+\s*)?(?:\*\*)?\s*(?:(?:new|rewritten|created)\s+)?"
    r"(?:task|instruction|prompt|problem|question|subtopic)\s*\d{0,3}\s*(?:#+)?\s*(?:\*\*)?\s*[:：]",
    re.IGNORECASE)
_STOP = re.compile(r"^\s*(?:\*\*)?(?:answer|solution|output|response|explanation)(?:\*\*)?\s*[:：]",
                   re.IGNORECASE)
_PREAMBLE = re.compile(r"^\s*(?:sure|certainly|of course|okay|ok|here(?:'s| is| are))\b.*[:!.]\s*$",
                       re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`", "«": "»"}


def clean_item(text: str) -> str:
    """One instruction/list item without numbering, bullets, labels, bold or quotes around it."""
    s = text.strip()
    for _ in range(4):  # "1. **New task:** "Write ..."" peels in several steps
        before = s
        s = _MARKER.sub("", s, count=1)
        s = _LABEL.sub("", s, count=1)
        s = s.strip()
        if s.startswith("**") and s.endswith("**") and len(s) > 4:
            s = s[2:-2].strip()
        if len(s) >= 2 and _QUOTES.get(s[0]) == s[-1]:
            s = s[1:-1].strip()
        if s == before:
            break
    return s


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def parse_instruction(text: str) -> str:
    """The one new instruction in a teacher's reply; "" when there is none.

    Drops a preamble ("Sure! Here is a new task:") and a bare label line ("#Rewritten Prompt#:"),
    strips numbering, bullets, "New task:"-style labels and surrounding quotes, and stops at the
    next item (a numbered line, "Task 4:") or at an "Answer:"/"Solution:" line.
    """
    lines = text.strip().splitlines()
    while lines and (not lines[0].strip() or not clean_item(lines[0])
                     or (_PREAMBLE.match(lines[0]) and len(lines) > 1)):
        lines.pop(0)
    if not lines:
        return ""
    kept = [lines[0]]
    for line in lines[1:]:
        if _ITEM_START.match(line) or _STOP.match(line):
            break
        kept.append(line)
    return clean_item("\n".join(kept).strip())


def parse_list(text: str) -> list[str]:
    """The items of a numbered or bulleted list (a line without a marker continues the item
    before it); with no markers at all, every non-empty line is an item. Items are cleaned
    (:func:`clean_item`), empty ones dropped, repeats (case- and space-insensitive) dropped.
    """
    lines = text.strip().splitlines()
    marked = any(_ITEM_START.match(ln) for ln in lines)
    items: list[list[str]] = []
    pending: list[str] = []  # lines after a blank line: the item's next paragraph, or an epilogue
    gap = False
    for line in lines:
        if not line.strip():
            gap = True
            continue
        if not marked or _ITEM_START.match(line):
            if items:
                items[-1] += pending
            items.append([line])
            pending, gap = [], False
        elif items and (gap or pending):  # a later paragraph of the item, kept as one
            pending += [""] * gap + [line]
            gap = False
        elif items:  # text before the first item is a preamble
            items[-1].append(line)
    # lines after the last item and a blank line ("Hope this helps!") are dropped
    out, seen = [], set()
    for parts in items:
        item = clean_item("\n".join(parts))
        if item and _norm(item) not in seen:
            seen.add(_norm(item))
            out.append(item)
    return out


def check_candidate(text: str, prompt: str, sources: list[str], max_chars: int) -> str | None:
    """Why a parsed instruction is not a new one (a reject reason), or None to keep it."""
    if not text.strip():
        return "empty: no instruction in the teacher's text"
    if len(text) > max_chars:
        return f"too_long: {len(text)} chars > max_chars={max_chars}"
    cand = _norm(text)
    if any(cand == _norm(s) for s in sources):
        return "identical: same text as the instruction it came from"
    if cand in _norm(prompt):
        return "echo: the text is a piece of the prompt"
    srcs = [_norm(s) for s in sources]
    for line in prompt.splitlines():
        fixed = _norm(line)  # template wording: a long prompt line holding no source text
        if len(fixed) >= 24 and not any(s in fixed or fixed in s for s in srcs) and fixed in cand:
            return f"echo: repeats the template line {line.strip()[:60]!r}"
    return None


# --------------------------------------------------------------------------- files


def write_seed_file(path: Path, seeds: list[Seed]) -> Path:
    """Seeds as a JSONL seed file (``read_seed_file`` reads it back), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for s in seeds:
            f.write(json.dumps({"id": s.id, "prompt": s.prompt, "reference": s.reference, **s.extra},
                               ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path




def request_order(record: dict) -> tuple[int, int]:
    """Sort key giving phase records in request order, whatever order they completed in."""
    return record["meta"]["index"], record["meta"].get("item", 0)


def dedup_new(ctx: ElicitContext, pool: list[Seed], candidates: list[Seed]) -> tuple[list[Seed], list[dict]]:
    """``candidates`` that duplicate neither ``pool`` nor an earlier candidate; and the dropped
    ones as rows with the reason. Exact repeats by id first, then ``ctx.dedup_texts``."""
    ids = {s.id for s in pool}
    fresh, dropped = [], []
    for c in candidates:
        if c.id in ids:
            dropped.append({"id": c.id, "prompt": c.prompt, "reason": "exact_dedup: same text as "
                            f"{c.id!r}", **c.extra})
        else:
            ids.add(c.id)
            fresh.append(c)
    kept, removed = ctx.dedup_texts(pool + fresh)
    kept_ids = {s.id for s in kept}
    pool_ids = {s.id for s in pool}
    dropped += [{"id": s.id, "prompt": s.prompt, "reason": reason, **s.extra}
                for s, reason in removed if s.id not in pool_ids]
    return [c for c in fresh if c.id in kept_ids], dropped


def generation_params(ctx: ElicitContext, temperature: float, top_p: float, max_new_tokens: int,
                      offset: int = 0) -> SamplingParams:
    """The run's sampling with a method's own temperature and length, one sample per request."""
    return dataclasses.replace(ctx.params, temperature=temperature, top_p=top_p, n=1,
                               max_new_tokens=max_new_tokens, seed=ctx.params.seed + offset)


# --------------------------------------------------------------------------- one round


def round_requests(cfg: ExpansionConfig, pool: list[Seed], frontier: list[Seed], rnd: int,
                   params: SamplingParams) -> list[GenerationRequest]:
    """The requests of round ``rnd``: fixed by the pool, the frontier and ``cfg.seed``."""
    rng = random.Random(f"expansion:{cfg.seed}:{cfg.strategy}:{rnd}")
    phase = f"expand_r{rnd}"
    reqs = []
    if cfg.strategy == "self_instruct":
        template = cfg.template(None)
        for i in range(cfg.per_round):
            examples = rng.sample(pool, min(cfg.examples_per_prompt, len(pool)))
            user = render(template, "expansion.self_instruct_template",
                          examples=[s.prompt for s in examples])
            reqs.append(GenerationRequest(
                f"{phase}:{i}", [{"role": "user", "content": user}], params,
                meta={"index": i, "round": rnd, "strategy": cfg.strategy, "evolution": None,
                      "parents": [s.id for s in examples], "sources": [s.prompt for s in examples]}))
        return reqs
    parents = list(frontier)
    rng.shuffle(parents)
    for i in range(cfg.per_round):
        parent = parents[i % len(parents)]
        op = rng.choice(cfg.evolutions)
        user = render(cfg.template(op), f"expansion.evolution_templates.{op}",
                      instruction=parent.prompt)
        reqs.append(GenerationRequest(
            f"{phase}:{i}", [{"role": "user", "content": user}], params,
            meta={"index": i, "round": rnd, "strategy": cfg.strategy, "evolution": op,
                  "parents": [parent.id], "sources": [parent.prompt]}))
    return reqs


def expansion_handler(cfg: ExpansionConfig, teacher_name: str):  # noqa: ANN201
    """Result -> one candidate instruction record (``id``, ``prompt``, provenance ``meta``)."""

    def handle(result: GenerationResult) -> Outcome:
        req, g = result.request, result.generations[0]
        if cfg.drop_truncated and g.finish_reason == "length":
            return Outcome(rejects=[(f"truncated: stopped at max_new_tokens ({g.num_tokens} tokens)",
                                     g.text)])
        text = parse_instruction(g.text)
        reason = check_candidate(text, req.messages[-1]["content"], req.meta["sources"], cfg.max_chars)
        if reason is not None:
            if reason.startswith("empty"):
                raise MalformedOutput(reason)
            return Outcome(rejects=[(reason, g.text)])
        meta = {k: req.meta[k] for k in ("index", "round", "strategy", "evolution", "parents")}
        return Outcome(records=[{"id": seed_id(text), "prompt": text,
                                 "meta": {**meta, "teacher": teacher_name,
                                          "finish_reason": g.finish_reason}}])

    return handle


def _candidates(path: Path) -> list[Seed]:
    rows = sorted(read_jsonl(path), key=request_order)
    return [Seed(r["id"], r["prompt"], None,
                 {"parents": r["meta"]["parents"], "strategy": r["meta"]["strategy"],
                  "evolution": r["meta"]["evolution"], "round": r["meta"]["round"]})
            for r in rows]


# --------------------------------------------------------------------------- the method


def run_expansion(ctx: ElicitContext, cfg: ExpansionConfig) -> MethodResult:
    """Grow ``ctx.seeds`` for ``cfg.rounds`` rounds, dedup, then label (see the module doc)."""
    if not ctx.seeds:
        raise ValueError("expansion needs seeds to grow from (seeds.path or seeds.task)")
    work = Path(ctx.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pool, frontier = list(ctx.seeds), list(ctx.seeds)
    new_all: list[Seed] = []
    phases: list[PhaseSummary] = []
    per_round: list[dict] = []
    handler = expansion_handler(cfg, ctx.teacher.name)
    for rnd in range(1, cfg.rounds + 1):
        params = generation_params(ctx, cfg.temperature, cfg.top_p, cfg.max_new_tokens, rnd)
        reqs = round_requests(cfg, pool, frontier or pool, rnd, params)
        path, summary = run_phase(f"expand_r{rnd}", reqs, ctx.teacher, handler, work,
                                  cache=ctx.cache, total=len(reqs), show_progress=ctx.show_progress)
        phases.append(summary)
        new, dropped = dedup_new(ctx, pool, _candidates(path))
        write_seed_file(work / f"expand_r{rnd}.seeds.jsonl", new)
        write_jsonl_atomic(work / f"expand_r{rnd}.duplicates.jsonl", dropped)
        per_round.append({"round": rnd, "requests": len(reqs), "candidates": summary.records,
                          "rejected": summary.rejects, "duplicates": len(dropped), "new": len(new)})
        pool += new
        new_all += new
        frontier = new
    instructions = write_seed_file(work / "expansion_instructions.jsonl", new_all)
    notes = {
        "strategy": cfg.strategy,
        "new_instructions": len(new_all),
        "duplicates_removed": sum(r["duplicates"] for r in per_round),
        "rejected": sum(r["rejected"] for r in per_round),
        "pool": len(pool),
        "rounds": per_round,
        "instructions": str(instructions),
    }
    records = None
    if cfg.label:
        to_label = (list(ctx.seeds) if cfg.include_seeds else []) + new_all
        records, summary = ctx.label(to_label, "expansion_labeled", "expansion")
        phases.append(summary)
        notes["labeled"] = len(to_label)
    return MethodResult(records=records, phases=phases, notes=notes)
