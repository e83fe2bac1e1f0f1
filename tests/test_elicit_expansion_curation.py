"""Expansion and curation: parsers on crafted teacher texts, then end to end on real tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from distillery.elicit.context import ElicitContext
from distillery.elicit.curation import CurationConfig, balance, run_curation
from distillery.elicit.expansion import (
    ExpansionConfig,
    check_candidate,
    parse_instruction,
    parse_list,
    run_expansion,
)
from distillery.elicit.filters import FilterConfig
from distillery.elicit.labeling import LabelingConfig
from distillery.elicit.seeds import Seed, read_seed_file, seed_id
from distillery.records import read_jsonl
from distillery.teachers import SamplingParams

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo_teacher"  # answers "12+34" with chains


# --------------------------------------------------------------------------- parsers


@pytest.mark.parametrize(("text", "expected"), [
    ("New task: Write a haiku about rain.", "Write a haiku about rain."),
    ("1. Write a haiku about rain.\n2. Write a limerick.", "Write a haiku about rain."),
    ('"Write a haiku about rain."', "Write a haiku about rain."),
    ("Sure! Here is a new task:\nWrite a haiku about rain.", "Write a haiku about rain."),
    ("#Rewritten Prompt#:\nWrite a haiku about rain, in French.\n\nAnswer: Pluie", "Write a haiku about rain, in French."),
    ("**New task:** “Write a haiku about rain.”", "Write a haiku about rain."),
    ("Task 4: Compute 12+34.\nTask 5: Compute 1+1.", "Compute 12+34."),
    ("- Explain recursion\nwith an example.\n- Another one", "Explain recursion\nwith an example."),
    ("Prompt engineering: explain it.", "Prompt engineering: explain it."),
    ("12+34=46;#46", "12+34=46;#46"),
    ("-5+3", "-5+3"),
    ("   \n  ", ""),
    ("New task:", ""),
])
def test_parse_instruction(text, expected):
    assert parse_instruction(text) == expected


def test_parse_list_numbered_bulleted_and_plain():
    text = ("Here are 4 tasks:\n1. Add 2 and 3.\n2) Multiply 4 by 5\n   and then add 1.\n\n"
            "3. ADD 2 and 3.\n4. **Task 4:** \"Divide 8 by 2.\"\n\nHope this helps!")
    assert parse_list(text) == ["Add 2 and 3.", "Multiply 4 by 5\n   and then add 1.", "Divide 8 by 2."]
    assert parse_list("- algebra\n* geometry\n• calculus\n+ number theory") == [
        "algebra", "geometry", "calculus", "number theory"]
    assert parse_list("alpha\nbeta\n\nalpha\n") == ["alpha", "beta"]  # no markers: lines
    assert parse_list("Task 1: foo\nTask 2: bar") == ["foo", "bar"]
    assert parse_list("1. a\n\n   second paragraph\n2. b") == ["a\n\n   second paragraph", "b"]
    assert parse_list("") == [] and parse_list("1. \n2. \"\"") == []


def test_check_candidate_reasons():
    prompt = ("Come up with one new task, different from the examples below.\n"
              "Task 1: Sort a list of numbers.\nTask 2: Reverse a string.\n"
              "Reply with the new task only: no answer, no numbering, no explanation.\nTask 3:")
    sources = ["Sort a list of numbers.", "Reverse a string."]
    ok = "Count the vowels in a word."
    assert check_candidate(ok, prompt, sources, 100) is None
    assert check_candidate("", prompt, sources, 100).startswith("empty")
    assert check_candidate(ok, prompt, sources, 10).startswith("too_long")
    assert check_candidate("reverse a  STRING.", prompt, sources, 100).startswith("identical")
    assert check_candidate("Task 3:", prompt, sources, 100).startswith("echo")
    assert check_candidate("Reply with the new task only: no answer, no numbering, no explanation. "
                           "Count vowels.", prompt, sources, 1000).startswith("echo")


def test_config_validation():
    assert ExpansionConfig().strategy == "self_instruct"
    with pytest.raises(ValidationError, match="no built-in template"):
        ExpansionConfig(strategy="evol_instruct", evolutions=["shorten"])
    ExpansionConfig(strategy="evol_instruct", evolutions=["shorten"],
                    evolution_templates={"shorten": "Shorten: {{ instruction }}"})
    with pytest.raises(ValidationError):
        ExpansionConfig(rounds=0)
    with pytest.raises(ValidationError):
        ExpansionConfig(unknown=1)
    cfg = CurationConfig(taxonomy=["math", "code"])
    assert cfg.taxonomy == {"math": [], "code": []}
    assert CurationConfig(taxonomy={"math": ["a", "a", " "]}).taxonomy == {"math": ["a"]}
    with pytest.raises(ValidationError):
        CurationConfig(taxonomy=[])


def test_balance_equal_per_topic_and_even_per_subtopic():
    def tasks(topic, sub, n):
        return [Seed(f"{topic}-{sub}-{i}", f"{topic} {sub} {i}", None, {"topic": topic, "subtopic": sub})
                for i in range(n)]

    items = tasks("a", "x", 5) + tasks("a", "y", 1) + tasks("b", "z", 3) + tasks("c", "w", 0)
    kept, dropped, count = balance(items, ["a", "b", "c"], None, rng_seed=0)
    assert count == 3 and len(kept) + len(dropped) == len(items)
    per = {t: sum(s.extra["topic"] == t for s in kept) for t in "abc"}
    assert per == {"a": 3, "b": 3, "c": 0}
    assert sum(s.extra["subtopic"] == "y" for s in kept) == 1  # the short subtopic gives all it has
    assert balance(items, ["a", "b", "c"], None, rng_seed=0)[0] == kept  # seeded
    assert [s.id for s in kept] == [s.id for s in items if s in kept]  # input order kept
    kept2, _, count2 = balance(items, ["a", "b"], 2, rng_seed=1)
    assert count2 == 2 and len(kept2) == 4
    kept3, _, _ = balance(items, ["a", "b"], 4, rng_seed=1, equalize=False)  # cap only
    assert sum(s.extra["topic"] == "a" for s in kept3) == 4 and len(kept3) == 7
    sub_counts = [sum(s.extra["subtopic"] == sub for s in balance(tasks("a", "x", 4) + tasks("a", "y", 4),
                                                                     ["a"], 4)[0]) for sub in "xy"]
    assert sub_counts == [2, 2]


# --------------------------------------------------------------------------- end to end


def _ctx(teacher, work_dir, seeds, max_new_tokens=24):
    return ElicitContext(
        seeds=seeds, teacher=teacher, params=SamplingParams(max_new_tokens=max_new_tokens),
        work_dir=Path(work_dir), labeling=LabelingConfig(chain_of_thought=False, require_answer=False),
        filters=FilterConfig(), show_progress=False)


def _accounted(work_dir: Path, phase: str, n_requests: int) -> None:
    """Every request of the phase ended as record(s) and/or reject(s), rejects with a reason."""
    recs = read_jsonl(work_dir / f"{phase}.jsonl")
    rejs = read_jsonl(work_dir / f"{phase}.rejects.jsonl")
    assert all(r["reason"] for r in rejs)
    assert len({r["meta"]["request_id"] for r in recs + rejs}) == n_requests


def _snapshot(work_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(work_dir.glob("*.jsonl"))}


def _no_time(text: str) -> list[dict]:
    rows = [json.loads(line) for line in text.splitlines()]
    return [{**r, "meta": {**r["meta"], "created": None}} if "meta" in r else r for r in rows]


def test_expansion_evol_end_to_end_dedup_and_rerun(demo_teacher, tmp_path):
    seeds = [Seed(seed_id(p), p) for p in ("12+34-5", "7+8-9", "21-3+4")]
    # the demo teacher answers arithmetic: with the parent as the whole prompt its chain is the
    # "evolved" instruction; every parent is evolved twice with one op under greedy decoding,
    # so each round plants exact duplicates
    cfg = ExpansionConfig(strategy="evol_instruct", rounds=2, per_round=6, evolutions=["deepen"],
                          evolution_templates={"deepen": "{{ instruction }}"}, temperature=0.0,
                          max_new_tokens=32, include_seeds=True)
    ctx = _ctx(demo_teacher, tmp_path, seeds)
    res = run_expansion(ctx, cfg)
    _accounted(tmp_path, "expand_r1", 6)
    _accounted(tmp_path, "expand_r2", 6)
    notes = res.notes
    assert notes["duplicates_removed"] >= 3
    dups = read_jsonl(tmp_path / "expand_r1.duplicates.jsonl")
    assert all(d["reason"].startswith(("exact_dedup", "near_dedup")) for d in dups)
    new = read_seed_file(tmp_path / "expansion_instructions.jsonl")
    assert len(new) == notes["new_instructions"] > 0
    assert len({s.id for s in new}) == len(new) and all(s.id == seed_id(s.prompt) for s in new)
    seed_texts = {s.prompt for s in seeds}
    assert not seed_texts & {s.prompt for s in new}
    r1 = read_seed_file(tmp_path / "expand_r1.seeds.jsonl")
    assert {s.extra["round"] for s in r1} == {1}
    for s in new:
        assert s.extra["strategy"] == "evol_instruct" and s.extra["evolution"] == "deepen"
        assert len(s.extra["parents"]) == 1
    assert all(s.extra["parents"][0] in {x.id for x in seeds} for s in r1)
    records = read_jsonl(res.records)
    _accounted(tmp_path, "expansion_labeled", len(seeds) + len(new))
    by_seed = {r["meta"]["seed_id"]: r for r in records}
    for s in new:
        if s.id in by_seed:
            meta = by_seed[s.id]["meta"]
            assert meta["method"] == "expansion" and meta["seed"]["parents"] == s.extra["parents"]
    assert [p.name for p in res.phases] == ["expand_r1", "expand_r2", "expansion_labeled"]

    # rerun in the same work_dir: nothing is asked again, the same files come out
    before, snap = demo_teacher.stats.requests, _snapshot(tmp_path)
    again = run_expansion(_ctx(demo_teacher, tmp_path, seeds), cfg)
    assert demo_teacher.stats.requests == before
    assert _snapshot(tmp_path) == snap and again.notes == notes

    # a crash after round 1: the pool is rebuilt from the round-1 phase file, round 2 and the
    # labels come out the same
    for p in tmp_path.glob("expand_r2*"):
        p.unlink()
    for p in tmp_path.glob("expansion_*"):
        p.unlink()
    again = run_expansion(_ctx(demo_teacher, tmp_path, seeds), cfg)
    assert demo_teacher.stats.requests == before + 6 + len(seeds) + len(new)
    assert again.notes == notes
    snap2 = _snapshot(tmp_path)
    assert snap2.keys() == snap.keys()
    assert all(_no_time(snap2[k]) == _no_time(snap[k]) for k in snap)


def test_expansion_self_instruct_tiny_teacher(tiny_teacher, tmp_path):
    seeds = [Seed(seed_id(p), p) for p in ("1+2", "3-4+5", "10+20", "7-1")]
    cfg = ExpansionConfig(rounds=2, per_round=4, examples_per_prompt=2, temperature=1.0,
                          max_new_tokens=16, drop_truncated=False, include_seeds=False)
    res = run_expansion(_ctx(tiny_teacher, tmp_path, seeds, max_new_tokens=8), cfg)
    for rnd in (1, 2):
        _accounted(tmp_path, f"expand_r{rnd}", 4)
        for req in read_jsonl(tmp_path / f"expand_r{rnd}.jsonl") + read_jsonl(tmp_path / f"expand_r{rnd}.rejects.jsonl"):
            assert req["meta"]["round"] == rnd and len(req["meta"]["parents"]) == 2
    assert res.notes["new_instructions"] + res.notes["duplicates_removed"] + res.notes["rejected"] == 8
    n_new = res.notes["new_instructions"]
    if n_new:  # the tiny teacher's labels are cut at max_new_tokens: records or rejects
        _accounted(tmp_path, "expansion_labeled", n_new)
        rows = read_jsonl(res.records) + read_jsonl(tmp_path / "expansion_labeled.rejects.jsonl")
        assert {(r["meta"].get("seed") or r["meta"]["extra"])["strategy"] for r in rows} == {"self_instruct"}
    before, snap = tiny_teacher.stats.requests, _snapshot(tmp_path)
    assert run_expansion(_ctx(tiny_teacher, tmp_path, seeds, max_new_tokens=8), cfg).notes == res.notes
    assert tiny_teacher.stats.requests == before and _snapshot(tmp_path) == snap


def test_curation_balance_dedup_and_rerun(demo_teacher, tmp_path):
    # the task template is the subtopic itself: the demo teacher's chain is the "task", one per
    # subtopic; "5+5" in both topics plants a cross-topic duplicate
    taxonomy = {"small": ["1+2", "3+4", "5+5", "7+1"], "large": ["5+5", "9+9", "2+6"]}
    cfg = CurationConfig(taxonomy=taxonomy, task_template="{{ subtopic }}", tasks_per_subtopic=2,
                         temperature=0.0, max_new_tokens=40)
    res = run_curation(_ctx(demo_teacher, tmp_path, []), cfg)
    _accounted(tmp_path, "curate_tasks", 7)
    notes = res.notes
    assert notes["duplicates_removed"] >= 1
    assert notes["per_topic_before"] == {"small": 4, "large": 2}
    assert notes["per_topic_after"] == {"small": 2, "large": 2}
    kept = read_seed_file(tmp_path / "curation_tasks.jsonl")
    assert len(kept) == 4 and len({s.prompt for s in kept}) == 4
    assert {s.extra["topic"] for s in kept} == {"small", "large"}
    assert all(s.extra["subtopic"] in taxonomy[s.extra["topic"]] for s in kept)
    dropped = read_jsonl(tmp_path / "curation_dropped.jsonl")
    assert sorted(d["reason"].split(":")[0] for d in dropped) == ["balance", "balance", "exact_dedup"]
    records = read_jsonl(res.records)
    _accounted(tmp_path, "curation_labeled", 4)
    assert all(r["meta"]["method"] == "curation" and r["meta"]["seed"]["topic"] in taxonomy for r in records)

    before, snap = demo_teacher.stats.requests, _snapshot(tmp_path)
    assert run_curation(_ctx(demo_teacher, tmp_path, []), cfg).notes == notes
    assert demo_teacher.stats.requests == before and _snapshot(tmp_path) == snap


def test_curation_teacher_fills_subtopics(tiny_teacher, tmp_path):
    cfg = CurationConfig(taxonomy={"algebra": [], "geometry": ["angles"]}, subtopics_per_topic=3,
                         tasks_per_subtopic=2, temperature=1.0, max_new_tokens=12, label=False)
    res = run_curation(_ctx(tiny_teacher, tmp_path, []), cfg)
    _accounted(tmp_path, "curate_subtopics", 1)
    taxonomy = json.loads((tmp_path / "curation_taxonomy.json").read_text())
    assert taxonomy["geometry"] == ["angles"] and 1 <= len(taxonomy["algebra"]) <= 3
    _accounted(tmp_path, "curate_tasks", len(taxonomy["algebra"]) + 1)
    after = res.notes["per_topic_after"]
    assert len({n for t, n in after.items() if t not in res.notes["empty_topics"]}) <= 1
    assert res.records is None and [p.name for p in res.phases] == ["curate_subtopics", "curate_tasks"]
    before = tiny_teacher.stats.requests
    assert run_curation(_ctx(tiny_teacher, tmp_path, []), cfg).notes == res.notes
    assert tiny_teacher.stats.requests == before
