"""The elicitation engine: exactly-once output across kills, the response cache, rejects."""

from __future__ import annotations

import json

import pytest

from conftest import label_plainly
from distillery.config import TaskConfig
from distillery.elicit.labeling import LabelingConfig, parse_answer, run_labeling
from distillery.elicit.seeds import Seed
from distillery.records import read_jsonl
from distillery.tasks import load_problems
from distillery.teachers import GenerationRequest, HFTeacher, SamplingParams
from distillery.teachers.phases import (
    MalformedOutput,
    Outcome,
    PhaseFiles,
    ResponseCache,
    run_phase,
)

PARAMS = SamplingParams(max_new_tokens=5)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    t = HFTeacher.from_pretrained(tiny_model_dir, device="cpu")
    t.batch_size = 4
    return t


def _requests(n, params=PARAMS):
    return [GenerationRequest(f"r{i}", [{"role": "user", "content": f"{i}+{i}"}], params) for i in range(n)]


def _one_record(result):
    r = result.request
    return Outcome(records=[{"id": r.id, "text": g.text} for g in result.generations])


def test_recover_keeps_finished_requests_and_drops_cut_ones(tmp_path):
    files = PhaseFiles(tmp_path, "p")
    rows = [
        {"id": "a0", "meta": {"request_id": "a", "outputs": 2}},
        {"id": "b0", "meta": {"request_id": "b", "outputs": 3}},  # b wrote 2 of its 3 lines
        {"id": "b1", "meta": {"request_id": "b", "outputs": 3}},
    ]
    rejects = [{"id": "a-reject", "meta": {"request_id": "a", "outputs": 2}}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"id": "c0", "me'  # torn last line
    PhaseFiles.partial(files.records).write_text(text)
    PhaseFiles.partial(files.rejects).write_text("".join(json.dumps(r) + "\n" for r in rejects))
    assert files.recover() == {"a"}
    kept = read_jsonl(PhaseFiles.partial(files.records))
    assert [r["id"] for r in kept] == ["a0"]  # b's partial lines and the torn line are gone


def test_killed_phase_resumes_with_each_record_exactly_once(tmp_path, teacher):
    reqs = _requests(10)
    run_phase("p", reqs[:6], teacher, _one_record, tmp_path, show_progress=False)
    files = PhaseFiles(tmp_path, "p")
    for path in (files.records, files.rejects):  # pretend the run died before finishing
        path.rename(PhaseFiles.partial(path))
    before = teacher.stats.requests
    path, summary = run_phase("p", reqs, teacher, _one_record, tmp_path, show_progress=False)
    assert teacher.stats.requests - before == 4
    assert summary.resumed == 6 and summary.records == 10
    ids = [r["id"] for r in read_jsonl(path)]
    assert sorted(ids) == sorted(r.id for r in reqs) and len(ids) == len(set(ids))
    # a finished phase is not run again
    before = teacher.stats.requests
    run_phase("p", reqs, teacher, _one_record, tmp_path, show_progress=False)
    assert teacher.stats.requests == before


def test_cache_makes_a_rerun_free_and_identical(tmp_path, teacher):
    cache = ResponseCache(tmp_path / "cache.sqlite")
    reqs = _requests(6)
    a, _ = run_phase("p", reqs, teacher, _one_record, tmp_path / "a", cache=cache, show_progress=False)
    assert len(cache) == 6
    before = teacher.stats.requests
    b, summary = run_phase("p", reqs, teacher, _one_record, tmp_path / "b", cache=cache, show_progress=False)
    assert teacher.stats.requests == before and summary.cached == 6
    assert sorted(map(json.dumps, read_jsonl(a))) == sorted(map(json.dumps, read_jsonl(b)))
    # another sampling is another question: not answered from the cache
    other = _requests(2, SamplingParams(max_new_tokens=3))
    run_phase("q", other, teacher, _one_record, tmp_path / "b", cache=cache, show_progress=False)
    assert teacher.stats.requests == before + 2


def test_bad_output_becomes_a_reject_with_its_reason_not_a_crash(tmp_path, teacher):
    def picky(result):
        if result.request.id == "r1":
            raise MalformedOutput("no score in the grader's text")
        if result.request.id == "r2":
            raise KeyError("bug")
        return _one_record(result)

    reqs = _requests(4)
    _, summary = run_phase("p", reqs, teacher, picky, tmp_path,
                           checks=[("short", lambda rec: "too short" if rec["id"] == "r3" else None)],
                           show_progress=False)
    rejects = {r["meta"]["request_id"]: r["reason"] for r in read_jsonl(tmp_path / "p.rejects.jsonl")}
    assert rejects["r1"].startswith("malformed: no score")
    assert rejects["r2"].startswith("handler_error KeyError")
    assert rejects["r3"] == "filter_short: too short"
    assert [r["id"] for r in read_jsonl(tmp_path / "p.jsonl")] == ["r0"]
    assert summary.records == 1 and summary.rejects == 3 and summary.requests == 4


@pytest.mark.parametrize(
    ("text", "rationale", "answer"),
    [
        ("2+3=5\nFinal answer: 5", "2+3=5", "5"),
        ("so **Final answer:** 42 ", "so", "42"),  # the shared extractor: anywhere in the text
        ("steps\n**Final answer:** 42", "steps", "42"),
        ("We get \\boxed{\\frac{3}{4}} here", "We get", "3/4"),  # LaTeX normalized
        ("3+4=7; 7*2=14; answer 14", "3+4=7; 7*2=14", "14"),
        ("The answer is 78-73", "", "78-73"),  # an expression stays whole
        ("12+34=46;46-5=41;#41", "12+34=46;46-5=41", "41"),
        ("Adding them, the answer is 7.", "Adding them,", "7"),
        ("no answer at all", "no answer at all", None),
    ],
)
def test_parse_answer_splits_rationale_and_answer(text, rationale, answer):
    assert parse_answer(text) == (rationale, answer)


def test_parse_answer_with_a_user_pattern():
    assert parse_answer("work...\nANSWER=[17]", r"ANSWER=\[(?P<answer>\d+)\]") == ("work...", "17")
    assert parse_answer("nothing", r"ANSWER=(\d+)") == ("nothing", None)


def test_labeling_rejects_truncated_and_answerless_outputs(tmp_path, teacher):
    seeds = [Seed(f"s{i}", f"{i}+1", str(i + 1)) for i in range(6)]
    cfg = LabelingConfig(chain_of_thought=False)
    path, summary = run_labeling(seeds, teacher, cfg, SamplingParams(max_new_tokens=3), tmp_path,
                                 show_progress=False)
    rejects = read_jsonl(tmp_path / "labeled.rejects.jsonl")
    # a random tiny model writes neither an end token nor "#answer" within 3 tokens
    assert summary.records + summary.rejects == 6 and len(rejects) == summary.rejects
    assert all(r["reason"].split(":")[0] in ("truncated", "no_answer") for r in rejects)
    assert all(r["meta"]["seed_id"] == r["meta"]["request_id"].split(":")[1] for r in rejects)


def test_demo_teacher_labels_with_provenance(tmp_path):
    teacher = HFTeacher.from_pretrained("assets/demo_teacher", device="cpu")
    problems = load_problems(TaskConfig(num_operands=3, digits=(1, 2)), "train", 16)
    path = label_plainly(problems, teacher, SamplingParams(max_new_tokens=48), tmp_path / "l.jsonl",
                          show_progress=False)
    recs = read_jsonl(path)
    assert len(recs) == 16
    right = sum(parse_answer(r["messages"][1]["content"])[1] == p.reference for r, p in zip(recs, problems))
    assert right >= 14  # the shipped teacher is ~98% accurate on this task
    m = recs[0]["meta"]
    assert m["method"] == "labeling" and m["seed_id"] == problems[0].id and m["rationale"]


def test_retryable_failures_are_retried_by_a_rerun_and_later_phases_catch_up(tmp_path):
    """Two chained phases against a real HTTP server: 503s (retries exhausted) make retryable
    rejects; the next run sends exactly those again, and the second phase, finished on the first
    phase's partial output, is re-opened for the records that were missing. A 400 stays final."""
    from distillery.teachers.openai import OpenAITeacher
    from distillery.teachers.phases import read_phase
    from fault_server import Fault, FaultServer

    def run_both(server):
        teacher = OpenAITeacher("m", server.base_url, max_retries=0, max_concurrency=4)
        a, sa = run_phase("a", _requests(6), teacher, _one_record, tmp_path, show_progress=False)
        chained = [GenerationRequest(f"b-{r['id']}", [{"role": "user", "content": "check " + r["text"]}], PARAMS)
                   for r in read_phase(a)]
        b, sb = run_phase("b", chained, teacher, _one_record, tmp_path, show_progress=False)
        return read_phase(a), read_phase(b), sa, sb

    faults = {"1+1": Fault.http(503), "2+2": Fault.http(503), "3+3": Fault.http(400)}
    with FaultServer(prompt_faults=faults) as server:
        a, b, sa, sb = run_both(server)
    assert len(a) == 3 and len(b) == 3
    assert (sa.failed, sa.retryable, sa.total) == (3, 2, 6)
    rejects = read_jsonl(tmp_path / "a.rejects.jsonl")
    assert sorted((r["meta"]["request_id"], r.get("retryable", False)) for r in rejects) == [
        ("r1", True), ("r2", True), ("r3", False)]
    assert (tmp_path / "a.retry").exists() and (tmp_path / "b.retry").exists()

    with FaultServer(prompt_faults={"3+3": Fault.http(400)}) as server:
        a, b, sa, sb = run_both(server)
        sent = sorted(x.prompt for x in server.arrivals)
    assert sent == ["1+1", "2+2", "check answer to: 1+1", "check answer to: 2+2"]
    assert sorted(r["id"] for r in a) == ["r0", "r1", "r2", "r4", "r5"]
    assert sorted(r["id"] for r in b) == ["b-r0", "b-r1", "b-r2", "b-r4", "b-r5"]
    assert (sa.failed, sa.retryable, sa.resumed) == (1, 0, 4)  # r3's 400 was not sent again
    assert not (tmp_path / "a.retry").exists() and not (tmp_path / "b.retry").exists()

    with FaultServer() as server:  # nothing left to do: nothing is sent
        run_both(server)
        assert server.arrivals == []
