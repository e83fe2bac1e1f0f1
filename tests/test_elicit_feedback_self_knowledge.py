"""Feedback and self-knowledge elicitation, with real models.

``assets/demo_teacher`` is a real small arithmetic model (trained on 3-operand +/- problems of
1-2 digit numbers, answering chains like ``12+34=46;46-5=41;#41``); ``tiny_model_dir`` is a
random tiny Llama (garbage).
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from distillery.answers import grade
from distillery.config import TaskConfig
from distillery.elicit.context import ElicitContext
from distillery.elicit.feedback import FeedbackConfig, assemble_preferences, run_feedback
from distillery.elicit.filters import FilterConfig
from distillery.elicit.labeling import LabelingConfig
from distillery.elicit.seeds import Seed, load_seeds
from distillery.elicit.self_knowledge import SelfKnowledgeConfig, parse_verdict, run_self_knowledge
from distillery.records import read_jsonl
from distillery.teachers.base import SamplingParams
from distillery.teachers.phases import MalformedOutput, ResponseCache
from distillery.teachers.replies import parse_grade

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo_teacher"
DEMO_TASK = TaskConfig(num_operands=3, digits=(1, 2), operations=["+", "-"])  # configs/demo_teacher.yaml


def symbolic_ok(output, reference):
    """What self-knowledge verifies with when the task names no grader."""
    return grade(output, reference, "symbolic").correct


@pytest.fixture
def demo(demo_teacher):
    return demo_teacher


@pytest.fixture
def tiny(tiny_teacher):
    return tiny_teacher


@pytest.fixture(scope="module")
def seeds():
    return load_seeds(DEMO_TASK, None, "train", 6)


def make_ctx(seeds, teacher, student, work, max_new_tokens=24, cache=None) -> ElicitContext:
    return ElicitContext(seeds=seeds, teacher=teacher, params=SamplingParams(max_new_tokens=max_new_tokens),
                         work_dir=Path(work), labeling=LabelingConfig(), filters=FilterConfig(),
                         student=student, cache=cache, show_progress=False)


def snapshot(work: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(work.glob("*.jsonl"))}


# --------------------------------------------------------------------------- parsers


@pytest.mark.parametrize(("text", "score", "rationale"), [
    ("Score: 7\nRationale: right answer, clear steps", 7, "right answer, clear steps"),
    ("**Score:** 7\n**Rationale:** fine", 7, "fine"),
    ("Rationale: the last step is wrong.\nScore: 3 out of 10", 3, "the last step is wrong."),
    ("The steps are fine.\nScore: 8/10", 8, "The steps are fine."),
    ("I would give it 7/10.", 7, ""),
    ('{"score": 9, "rationale": "all correct"}', 9, "all correct"),
    ('```json\n{"Score": "6/10", "reason": "sloppy"}\n```', 6, "sloppy"),
    ("Score: 2.5\nRationale: half", 2.5, "half"),
    ("Rating: 10", 10, ""),
    ("Score: 4\nScore: 5\nRationale: changed my mind", 5, "changed my mind"),
])
def test_parse_grade_formats(text, score, rationale):
    got, why = parse_grade(text, max_score=10)
    assert got == score and type(got) is type(score)
    assert why == rationale


@pytest.mark.parametrize("text", [
    "", "hello", "12+34=46;46-5=41;#41", "Score: 11", "Score: 0", "Score: 4/5", '{"score": true}',
    "It is 3/4 done",
])
def test_parse_grade_malformed(text):
    with pytest.raises(MalformedOutput):
        parse_grade(text, max_score=10)


@pytest.mark.parametrize(("text", "verdict"), [
    ("Verdict: correct", True), ("The sum is right.\n**Verdict:** Incorrect", False),
    ("Verdict: not correct", False), ('{"verdict": "correct"}', True), ('{"correct": false}', False),
    ("steps check out\nCorrect.", True), ("Verdict - wrong", False), ("Verdict: yes", True),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) is verdict


@pytest.mark.parametrize("text", ["", "hmm", "12+3=15;#15", "Verdict: maybe"])
def test_parse_verdict_malformed(text):
    with pytest.raises(MalformedOutput):
        parse_verdict(text)


# --------------------------------------------------------------------------- preference assembly


def graded(seed: str, scores: list[float], texts: list[str] | None = None, index: int = 0) -> list[dict]:
    texts = texts or [f"answer {seed} {j}" for j in range(len(scores))]
    return [{"id": f"{seed}-s{j}", "seed_id": seed, "index": index, "sample": j, "prompt": f"prompt {seed}",
             "answer": t, "reference": "1", "score": s, "rationale": f"r{j}", "judge": "T",
             "student": "S", "created": f"2024-01-01T00:00:0{j}Z"} for j, (s, t) in enumerate(zip(scores, texts))]


def test_best_worst_pairs_margin_and_ties():
    cfg = FeedbackConfig(min_margin=2)
    items = (graded("a", [5, 9, 2, 9, 2], index=0) + graded("b", [6, 7], index=1)
             + graded("c", [8], index=2) + graded("d", [3, 9], ["same", " same "], index=3))
    prefs, dropped, notes = assemble_preferences(items, cfg)
    assert [p["id"] for p in prefs] == ["a-s1-s2"]  # ties: the lowest sample index wins
    p = prefs[0]
    assert p["prompt"] == [{"role": "user", "content": "prompt a"}]
    assert p["chosen"][0]["content"] == "answer a 1" and p["rejected"][0]["content"] == "answer a 2"
    assert p["meta"]["scores"] == {"judge": 9, "judge_rejected": 2} and p["meta"]["margin"] == 7
    assert p["meta"]["created"] == "2024-01-01T00:00:02Z"
    assert {d["meta"]["seed_id"]: d["reason"].split(":")[0] for d in dropped} == {
        "b": "margin", "c": "single_answer", "d": "identical"}
    assert notes["pairs"] == 1 and notes["prompts_with_pairs"] == 1 and notes["graded"] == 10
    assert notes["score_histogram"] == {"2": 2, "3": 1, "5": 1, "6": 1, "7": 1, "8": 1, "9": 3}


def test_all_pairs_above_margin():
    cfg = FeedbackConfig(pairs="all", min_margin=2)
    prefs, dropped, _ = assemble_preferences(graded("a", [5, 9, 2, 8], ["x", "y", "z", "y"]), cfg)
    pairs = [(p["chosen"][0]["content"], p["rejected"][0]["content"], p["meta"]["margin"]) for p in prefs]
    # 9 > 5 (4), 9 > 2 (7), 8 > 2 (6), 5 > 2 (3); 8 vs 5 is below the margin; the second "y"
    # repeats (y, z) and (y, x) texts already paired
    assert pairs == [("y", "z", 7), ("y", "x", 4), ("x", "z", 3)]
    assert all(c != r for c, r, _ in pairs) and not dropped
    assert len({p["id"] for p in prefs}) == len(prefs)


def test_chosen_from_correction_when_every_answer_is_bad():
    cfg = FeedbackConfig(correct_below=5, chosen_from_correction=True)
    items = graded("a", [2, 3, 1]) + graded("b", [9, 2], index=1)
    corr = {i["id"]: {"id": f"{i['seed_id']}-c{i['sample']}",
                      "messages": [{"role": "user", "content": i["prompt"]},
                                   {"role": "assistant", "content": f"fixed {i['id']}"}]}
            for i in items if i["score"] < 5}
    prefs, _, _ = assemble_preferences(items, cfg, corr)
    a, b = prefs
    assert a["chosen"][0]["content"] == "fixed a-s2" and a["rejected"][0]["content"] == "answer a 2"
    assert a["meta"]["chosen_source"] == "correction" and a["meta"]["scores"] == {"judge_rejected": 1}
    assert b["meta"]["chosen_source"] == "student" and b["meta"]["scores"]["judge"] == 9
    all_prefs, _, _ = assemble_preferences(items, cfg.model_copy(update={"pairs": "all"}), corr)
    assert sum(p["meta"]["chosen_source"] == "correction" for p in all_prefs) == 3
    none, dropped, _ = assemble_preferences(graded("a", [2, 3]), cfg, {})
    assert not none and dropped[0]["reason"].startswith("no_correction")


def test_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        FeedbackConfig(samples_per_prompt=2, student_temperature=0)
    with pytest.raises(ValueError, match="correct_below"):
        FeedbackConfig(chosen_from_correction=True)
    with pytest.raises(ValueError, match="min_pass_rate"):
        SelfKnowledgeConfig(min_pass_rate=0.8, max_pass_rate=0.2)
    with pytest.raises(ValueError, match="temperature"):
        SelfKnowledgeConfig(k=2, temperature=0)


# --------------------------------------------------------------------------- self-knowledge


def recount(samples_path: Path) -> dict[str, float]:
    """Pass rates from the samples file, re-verified here from the raw texts."""
    by_seed = defaultdict(list)
    for s in read_jsonl(samples_path):
        text, ref = s["messages"][-1]["content"], s["reference"]
        ok = s["meta"]["finish_reason"] != "length" and symbolic_ok(text, ref)
        assert ok == s["meta"]["correct"]
        by_seed[s["meta"]["seed_id"]].append(ok)
    return {k: sum(v) / len(v) for k, v in by_seed.items()}


def test_self_knowledge_demo_student(demo, seeds, tmp_path):
    cfg = SelfKnowledgeConfig(k=4, temperature=1.0, max_new_tokens=28, keep_per_problem=2)
    ctx = make_ctx(seeds, demo, demo, tmp_path)
    before = demo.stats.requests
    result = run_self_knowledge(ctx, cfg)
    assert demo.stats.requests - before == len(seeds)  # one request (k samples) per problem
    kept = read_jsonl(result.records)
    rates = recount(tmp_path / "self_knowledge_samples.jsonl")
    assert len(rates) == len(seeds) and all(0 <= r <= 1 for r in rates.values())
    assert sum(r > 0 for r in rates.values()) >= 0.75 * len(seeds)  # the demo model is ~98% right
    refs = {s.id: s for s in seeds}
    per_seed = defaultdict(list)
    for rec in kept:
        m = rec["meta"]
        assert m["method"] == "self_knowledge" and m["verifier"] == "reference" and not m["rationalized"]
        assert m["pass_rate"] == rates[m["seed_id"]]
        assert symbolic_ok(rec["messages"][-1]["content"], refs[m["seed_id"]].reference)
        assert rec["messages"][0]["content"] == refs[m["seed_id"]].prompt
        assert "request_id" not in m
        per_seed[m["seed_id"]].append(rec["messages"][-1]["content"])
    assert all(len(v) == len(set(v)) <= 2 for v in per_seed.values())  # distinct, capped
    assert result.notes["problems_kept"] == len(per_seed) == sum(r > 0 for r in rates.values())
    assert result.notes["pass_rate_mean"] == pytest.approx(sum(rates.values()) / len(rates), abs=1e-4)
    files = snapshot(tmp_path)

    # a rerun asks nothing and writes the same bytes
    before = demo.stats.requests
    again = run_self_knowledge(make_ctx(seeds, demo, demo, tmp_path), cfg)
    assert demo.stats.requests == before and snapshot(tmp_path) == files
    assert again.notes == result.notes

    # a pass-rate band re-selects from the same samples: too easy (and too hard) problems drop
    band = cfg.model_copy(update={"min_pass_rate": 0.3, "max_pass_rate": 0.9})
    banded = run_self_knowledge(make_ctx(seeds, demo, demo, tmp_path), band)
    assert demo.stats.requests == before
    kept_ids = {r["meta"]["seed_id"] for r in read_jsonl(banded.records)}
    assert kept_ids == {k for k, r in rates.items() if 0.3 <= r <= 0.9}
    dropped = read_jsonl(tmp_path / "self_knowledge_kept.rejects.jsonl")
    easy = {d["meta"]["seed_id"] for d in dropped if d["reason"].startswith("too_easy")}
    assert easy == {k for k, r in rates.items() if r > 0.9}


def test_self_knowledge_tiny_student_rationalization(tiny, demo, seeds, tmp_path):
    cfg = SelfKnowledgeConfig(k=2, temperature=1.0, max_new_tokens=12, rationalize=True,
                              rationalize_max_new_tokens=12)
    cache = ResponseCache(tmp_path / "cache.sqlite")
    seeds = seeds[:5]
    result = run_self_knowledge(make_ctx(seeds, demo, tiny, tmp_path / "a", cache=cache), cfg)
    rates = recount(tmp_path / "a" / "self_knowledge_samples.jsonl")
    assert sum(rates.values()) <= 1  # a random model solves (nearly) nothing
    unsolved = [s for s in seeds if rates[s.id] == 0]
    rat = read_jsonl(tmp_path / "a" / "self_knowledge_rationales.rejects.jsonl")
    rat_ok = read_jsonl(tmp_path / "a" / "self_knowledge_rationales.jsonl")
    assert len(rat) + len(rat_ok) == len(unsolved)  # one rationalization per unsolved problem
    for r in rat:  # garbage never verifies; the request carried the hint
        assert r["reason"].split(":")[0] in ("rationalization_wrong", "truncated")
        assert f"the correct answer is {r['meta']['reference']}" in r["messages"][-1]["content"]
    kept = read_jsonl(result.records)
    assert all(r["meta"]["rationalized"] for r in kept if rates[r["meta"]["seed_id"]] == 0)
    assert result.notes["rationalized"] == len(rat_ok)

    # the teacher rationalizes (the demo model cannot read a hint, so its template shows only
    # the prompt): kept when it verifies, and the record's prompt never holds the template text
    teach = cfg.model_copy(update={"rationalizer": "teacher", "max_new_tokens": 12,
                                   "rationalize_template": "{{ prompt }}{% if reference %}{% endif %}",
                                   "rationalize_max_new_tokens": 32})
    student_before = tiny.stats.requests
    result = run_self_knowledge(make_ctx(seeds, demo, tiny, tmp_path / "b", cache=cache), teach)
    assert tiny.stats.requests == student_before  # samples came from the response cache
    kept = read_jsonl(result.records)
    rationalized = [r for r in kept if r["meta"]["rationalized"]]
    assert len(rationalized) >= len(unsolved) // 2 and result.notes["rationalized"] == len(rationalized)
    by_id = {s.id: s for s in seeds}
    for r in rationalized:
        seed = by_id[r["meta"]["seed_id"]]
        assert r["messages"][0]["content"] == seed.prompt
        assert symbolic_ok(r["messages"][-1]["content"], seed.reference)
        assert r["meta"]["pass_rate"] == 0 and r["meta"]["teacher"] == demo.name
    cache.close()


def test_self_knowledge_teacher_verifier_and_unreferenced(tiny, seeds, tmp_path):
    mixed = seeds[:3] + [Seed("noref", "7+8-1", None)]
    # reference verifier: the seed without a reference is rejected, never sampled
    before = tiny.stats.requests
    res = run_self_knowledge(make_ctx(mixed, tiny, tiny, tmp_path / "ref"),
                             SelfKnowledgeConfig(k=2, max_new_tokens=8))
    assert tiny.stats.requests - before == 3
    dropped = read_jsonl(tmp_path / "ref" / "self_knowledge_kept.rejects.jsonl")
    assert {d["meta"]["seed_id"] for d in dropped if d["reason"].startswith("no_reference")} == {"noref"}
    # teacher verifier (a random model: its verdicts are unparsable -> rejects, not a crash)
    cfg = SelfKnowledgeConfig(k=2, max_new_tokens=8, verifier="teacher", drop_truncated=False)
    res = run_self_knowledge(make_ctx(mixed, tiny, tiny, tmp_path / "t", max_new_tokens=8), cfg)
    samples = read_jsonl(tmp_path / "t" / "self_knowledge_samples.jsonl")
    verdicts = read_jsonl(tmp_path / "t" / "self_knowledge_verdicts.jsonl")
    vrej = read_jsonl(tmp_path / "t" / "self_knowledge_verdicts.rejects.jsonl")
    assert len(samples) == 8 and len(verdicts) + len(vrej) == 8
    assert all(r["reason"].startswith("malformed") for r in vrej)
    assert "Verdict: correct" in vrej[0]["messages"][-1]["content"] if vrej else True
    assert res.notes["problems"] == 4


# --------------------------------------------------------------------------- feedback


def test_feedback_mechanics_and_rerun(tiny, demo, seeds, tmp_path):
    cfg = FeedbackConfig(samples_per_prompt=2, student_temperature=1.0, student_max_new_tokens=8,
                         correct_below=5)
    ctx = make_ctx(seeds[:3], demo, tiny, tmp_path, max_new_tokens=8)
    t0, s0 = demo.stats.requests, tiny.stats.requests
    result = run_feedback(ctx, cfg)
    assert tiny.stats.requests - s0 == 3 and demo.stats.requests - t0 >= 6
    samples = read_jsonl(tmp_path / "feedback_samples.jsonl")
    grades = read_jsonl(tmp_path / "feedback_grades.jsonl")
    rejects = read_jsonl(tmp_path / "feedback_grades.rejects.jsonl")
    assert len(samples) == 6
    # every student answer ends graded or rejected with a reason, never both, never lost
    assert sorted([g["id"] for g in grades] + [r["meta"]["sample_id"] for r in rejects]) == \
        sorted(s["id"] for s in samples)
    # the grade prompt (~320 tokens) does not fit the demo model's 128-token context
    assert all(r["reason"].startswith("too_long") for r in rejects)
    assert result.notes["samples"] == 6 and result.notes["graded"] == len(grades)
    assert result.preferences.exists() and result.records is not None
    assert "Score: <integer from 1 to 10>" in rejects[0]["messages"][-1]["content"]
    files = snapshot(tmp_path)
    t0, s0 = demo.stats.requests, tiny.stats.requests
    again = run_feedback(make_ctx(seeds[:3], demo, tiny, tmp_path, max_new_tokens=8), cfg)
    assert (demo.stats.requests, tiny.stats.requests) == (t0, s0)
    assert snapshot(tmp_path) == files and again.notes == result.notes


def test_feedback_corrections_and_pairs(tiny, demo, seeds, tmp_path):
    """Graded answers (crafted grades over real student samples) -> real teacher corrections."""
    cfg = FeedbackConfig(samples_per_prompt=2, student_temperature=1.0, student_max_new_tokens=10,
                         grade_template="{{ prompt }}", correct_below=5, chosen_from_correction=True,
                         correct_template="{{ prompt }}{% if answer %}{% endif %}")
    some = seeds[:4]
    work = tmp_path / "w"
    # the student's answers, graded by the demo model (unparsable), then a crafted grades file
    run_feedback(make_ctx(some, demo, tiny, tmp_path / "first"), cfg.model_copy(update={"correct_below": None,
                                                                                       "chosen_from_correction": False}))
    work.mkdir()
    shutil.copy(tmp_path / "first" / "feedback_samples.jsonl", work)
    shutil.copy(tmp_path / "first" / "feedback_samples.rejects.jsonl", work)
    samples = read_jsonl(work / "feedback_samples.jsonl")
    crafted = {0: (2, 3), 1: (9, 1), 2: (6, 6), 3: (4, 8)}  # seed index -> scores of samples 0, 1


    with (work / "feedback_grades.jsonl").open("w") as f:
        for s in samples:
            m = s["meta"]
            score = crafted[m["index"]][m["sample"]]
            f.write(json.dumps({"id": s["id"], "score": score, "rationale": f"why {score}",
                                "meta": {"seed_id": m["seed_id"], "index": m["index"], "sample": m["sample"],
                                         "judge": "crafted", "scores": {"judge": score},
                                         "request_id": f"g:{s['id']}", "outputs": 1}}) + "\n")
    (work / "feedback_grades.rejects.jsonl").write_text("")
    s0 = tiny.stats.requests
    result = run_feedback(make_ctx(some, demo, tiny, work, max_new_tokens=32), cfg)
    assert tiny.stats.requests == s0
    corrections = read_jsonl(result.records)
    low = [(i, j) for i, sc in crafted.items() for j, x in enumerate(sc) if x < 5]
    rej = read_jsonl(work / "feedback_corrections.rejects.jsonl")
    assert len(corrections) + len(rej) == len(low)
    by_id = {s.id: s for s in some}
    for c in corrections:
        m = c["meta"]
        assert m["method"] == "feedback" and m["student_score"] < 5 and m["rationale"] == f"why {m['student_score']}"
        assert m["student_answer"] == next(s["messages"][-1]["content"] for s in samples if s["id"] == m["corrects"])
        assert c["messages"][0]["content"] == by_id[m["seed_id"]].prompt
    # the demo model answers the arithmetic prompt right: corrections verify
    assert sum(symbolic_ok(c["messages"][-1]["content"], c["reference"])
               for c in corrections) >= len(corrections) - 1
    prefs = {p["meta"]["seed_id"]: p for p in read_jsonl(result.preferences)}
    ids = [s.id for s in some]
    if ids[0] + "-s0" in {c["meta"]["corrects"] for c in corrections}:  # every answer bad: correction wins
        p = prefs[ids[0]]
        assert p["meta"]["chosen_source"] == "correction" and p["rejected"][0]["content"] == next(
            s["messages"][-1]["content"] for s in samples if s["id"] == ids[0] + "-s0")
    assert prefs[ids[1]]["meta"]["scores"] == {"judge": 9, "judge_rejected": 1}
    assert ids[2] not in prefs  # a tie: no pair
    assert prefs[ids[3]]["meta"]["chosen_sample"] == ids[3] + "-s1"
    assert result.notes["score_histogram"] == {"1": 1, "2": 1, "3": 1, "4": 1, "6": 2, "8": 1, "9": 1}


def test_select_with_teacher_verdicts():
    from distillery.elicit.self_knowledge import select

    seeds = [Seed(f"p{i}", f"prompt {i}", str(i)) for i in range(3)]
    samples = [{"id": f"p{i}-s{j}", "messages": [{"role": "user", "content": f"prompt {i}"},
                                                 {"role": "assistant", "content": t}],
                "reference": str(i), "meta": {"seed_id": f"p{i}", "index": i, "sample": j}}
               for i in range(3) for j, t in enumerate(["a", "a ", "b", "c"])]
    verdicts = {"p0-s0": True, "p0-s1": True, "p0-s2": True, "p0-s3": False,  # 3/4
                "p1-s0": False, "p1-s1": True}  # 1/2 judged; p2: no usable verdict
    cfg = SelfKnowledgeConfig(verifier="teacher", keep_per_problem=None, max_pass_rate=0.9)
    kept, dropped, notes = select(seeds, samples, verdicts, [], cfg)
    assert [r["id"] for r in kept] == ["p0-s0", "p0-s2", "p1-s1"]  # "a " repeats "a"
    assert kept[0]["meta"]["pass_rate"] == 0.75 and kept[2]["meta"]["pass_rate"] == 0.5
    assert [d["reason"].split(":")[0] for d in dropped] == ["unjudged"]
    assert notes["pass_rate_mean"] == 0.625 and notes["problems_kept"] == 2
    kept, dropped, _ = select(seeds, samples, verdicts, [], cfg.model_copy(update={"max_pass_rate": 0.6}))
    assert [r["id"] for r in kept] == ["p1-s1"] and dropped[0]["reason"].startswith("too_easy")
