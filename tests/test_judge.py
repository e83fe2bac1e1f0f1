"""LLM-as-judge: pairwise in both orders, win rates, length control, pointwise grades, caching.

The students' answers are real: ``assets/demo_teacher`` (a small trained arithmetic model,
~95% greedy) served by ``distillery serve`` and called through ``OpenAITeacher`` — greedy
("strong") and at temperature 2 ("weak"). The judges are rule-based backends
(``tests/rule_judge.py``) so each test knows what a perfect, position-biased or length-biased
judge says; the caching test judges with the served model itself and counts its requests.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.answers import extract_final_answer
from distillery.config import TaskConfig
from distillery.evaluate.judge import (
    Comparison,
    JudgeItem,
    as_items,
    combine_verdicts,
    compare_pairwise,
    fit_logistic,
    grade_pointwise,
    grade_summary,
    length_controlled_win_rate,
    length_feature,
    pairwise_summary,
    parse_pairwise_verdict,
    position_bias_rate,
    win_rate,
)
from distillery.serve import start_server
from distillery.tasks import is_correct, load_problems
from distillery.teachers.base import SamplingParams
from distillery.teachers.openai import OpenAITeacher
from distillery.teachers.phases import MalformedOutput, ResponseCache
from rule_judge import Crash, RuleJudge, always, grade_by_reference, prefers_correct, prefers_longer

pytestmark = pytest.mark.usefixtures("one_thread")

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo_teacher"
TASK = TaskConfig(num_operands=3, digits=(1, 2), operations=["+", "-"])
N = 64


@pytest.fixture(scope="module")
def server():
    with start_server(DEMO, model_name="demo", device="cpu", max_batch_size=N) as handle:
        yield handle


@pytest.fixture(scope="module")
def demo(server):
    return OpenAITeacher("demo", server.base_url)


@pytest.fixture(scope="module")
def problems():
    return load_problems(TASK, "eval", N)


def answers(teacher, problems, **sampling) -> list[JudgeItem]:
    convs = [[{"role": "user", "content": p.prompt}] for p in problems]
    outs = teacher.generate(convs, SamplingParams(**sampling))
    return [JudgeItem(p.id, p.prompt, o[0].text, p.reference) for p, o in zip(problems, outs)]


@pytest.fixture(scope="module")
def strong(demo, problems):
    return answers(demo, problems, max_new_tokens=32)


@pytest.fixture(scope="module")
def weak(demo, problems):
    return answers(demo, problems, max_new_tokens=32, temperature=2.0, seed=1)


def quiet(**kw) -> dict:
    return {"show_progress": False, **kw}


# --------------------------------------------------------------------------- pairwise


@pytest.mark.parametrize("position", ["A", "B"])
def test_position_biased_judge_gives_half_after_swapping(strong, weak, tmp_path, position):
    judge = RuleJudge(always(position))
    comps = compare_pairwise(judge, strong, weak, tmp_path, **quiet())
    assert judge.stats.requests == 2 * N  # every pair judged in both orders
    # one order alone would say strong wins every pair (A) or loses every pair (B) ...
    assert {c.a_first for c in comps} == {c.b_first for c in comps} == {position}
    # ... both orders together expose it: every pair is inconsistent, a tie
    assert {c.outcome for c in comps} == {"inconsistent"}
    wr = win_rate(comps)
    assert (wr.rate, wr.lo, wr.hi, wr.n, wr.inconsistent) == (0.5, 0.5, 0.5, N, N)
    assert position_bias_rate(comps) == 1.0


def expected_scores(items_a, items_b) -> list[float]:
    """A perfect judge's per-pair score for A, written from the ground truth directly."""
    return [(1 + is_correct(a.answer, a.reference) - is_correct(b.answer, b.reference)) / 2
            for a, b in zip(items_a, items_b)]


def test_correct_judge_prefers_the_better_model(strong, weak, tmp_path):
    judge = RuleJudge(prefers_correct)
    comps = compare_pairwise(judge, strong, weak, tmp_path / "ab", **quiet())
    truth = expected_scores(strong, weak)
    assert 0 < truth.count(0.5) < N and truth.count(1.0) > truth.count(0.0)  # a real contest
    assert [c.score for c in comps] == truth
    wr = win_rate(comps)
    print(f"\nstrong vs weak: win rate {wr.rate:.3f} [{wr.lo:.3f}, {wr.hi:.3f}] "
          f"(W/T/L {wr.wins}/{wr.ties}/{wr.losses})")
    assert wr.rate == pytest.approx(np.mean(truth), abs=1e-12)
    assert wr.lo > 0.5 and wr.lo <= wr.rate <= wr.hi
    assert wr.inconsistent == 0 and position_bias_rate(comps) == 0.0
    # the other way round: the weak model's win rate is the complement
    back = win_rate(compare_pairwise(judge, weak, strong, tmp_path / "ba", **quiet()))
    assert back.rate == pytest.approx(1 - wr.rate, abs=1e-12) and back.hi < 0.5


FILLER = " Let me double-check every step of this once more, carefully."


def padded(items: list[JudgeItem], lengths: list[int], tag: str) -> list[JudgeItem]:
    text = FILLER * 10
    return [JudgeItem(f"{it.id}-{tag}", it.prompt, it.answer + text[:n], it.reference)
            for it, n in zip(items, lengths)]


def test_length_biased_judge_is_corrected_by_length_control(strong, tmp_path):
    """Same answers on both sides (equal quality), A padded more on average; the judge likes
    length. The raw win rate rewards A's padding; at equal length A wins half the time."""
    rng = np.random.default_rng(0)
    base = [it for it in strong for _ in range(6)]  # 6 padding draws per real answer
    base = [JudgeItem(f"{it.id}-{i % 6}", it.prompt, it.answer, it.reference) for i, it in enumerate(base)]
    len_a, len_b = rng.integers(0, 400, len(base)), rng.integers(0, 160, len(base))
    a, b = padded(base, len_a, "v"), padded(base, len_b, "v")
    judge = RuleJudge(prefers_longer(strength=3.0, scale=100.0))
    comps = compare_pairwise(judge, a, b, tmp_path, **quiet())
    assert position_bias_rate(comps) == 0.0  # the judge is consistent, only length-biased
    raw = win_rate(comps)
    lc = length_controlled_win_rate(comps, [len(x.answer) for x in a], [len(x.answer) for x in b])
    print(f"\nlength-biased judge: raw {raw.rate:.3f} [{raw.lo:.3f}, {raw.hi:.3f}], "
          f"LC {lc.rate:.3f} [{lc.lo:.3f}, {lc.hi:.3f}], slope {lc.slope:.2f}")
    assert raw.lo > 0.6  # padding wins
    assert lc.lo < 0.5 < lc.hi and abs(lc.rate - 0.5) < 0.08  # length controlled: a coin flip
    assert lc.slope > 1.0 and lc.raw == pytest.approx(raw.rate)
    summary = pairwise_summary(comps, [len(x.answer) for x in a], [len(x.answer) for x in b], resamples=200)
    assert summary["length_controlled"]["rate"] == pytest.approx(lc.rate)
    assert summary["position_bias_rate"] == 0.0 and summary["position_bias_n"] == len(comps)


def test_judge_killed_mid_run_resumes_without_repeating_calls(strong, weak, tmp_path):
    full = compare_pairwise(RuleJudge(prefers_correct), strong, weak, tmp_path / "full", **quiet())
    dying = RuleJudge(prefers_correct, crash_after=37)
    with pytest.raises(Crash):
        compare_pairwise(dying, strong, weak, tmp_path / "run", **quiet())
    partial = tmp_path / "run" / "judge_pairwise.jsonl.partial"
    assert len(partial.read_text().splitlines()) == 37
    again = RuleJudge(prefers_correct)
    resumed = compare_pairwise(again, strong, weak, tmp_path / "run", **quiet())
    assert again.stats.requests == 2 * N - 37
    assert resumed == full


# --------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(("text", "verdict"), [
    ("A is clearer. [[A]]", "A"), ("[[b]]", "B"), ("Equally good: [[C]]", "tie"), ("[[ tie ]]", "tie"),
    ("First I thought [[A]], but on reflection [[B]]", "B"), ('{"winner": "A"}', "A"),
    ('```json\n{"verdict": "tie"}\n```', "tie"),
])
def test_parse_pairwise_verdict(text, verdict):
    assert parse_pairwise_verdict(text) == verdict


@pytest.mark.parametrize("text", ["", "A is better", "[A]", "[[D]]", '{"winner": "neither"}'])
def test_parse_pairwise_verdict_malformed(text):
    with pytest.raises(MalformedOutput):
        parse_pairwise_verdict(text)


VERDICTS = st.sampled_from(["A", "B", "tie", None])


@given(VERDICTS, VERDICTS)
def test_combine_verdicts_properties(first, second):
    out = combine_verdicts(first, second)
    # swapping the models: the prompt that showed A first now shows the new B first, and the
    # judge's reply to it is the same text, so the two verdicts trade places: win <-> loss
    mirrored = combine_verdicts(second, first)
    assert mirrored == {"win": "loss", "loss": "win"}.get(out, out)
    if first is None or second is None:
        assert out is None
    elif first == second != "tie":
        assert out == "inconsistent"  # the same position both times: position bias, a tie


def test_unjudged_pairs_are_counted_not_scored():
    comps = [Comparison("1", "A", "B", "win"), Comparison("2", "B", "A", "loss"),
             Comparison("3", "A", None, None), Comparison("4", "tie", "tie", "tie")]
    wr = win_rate(comps)
    assert (wr.rate, wr.n, wr.unjudged, wr.wins, wr.losses, wr.ties) == (0.5, 3, 1, 1, 1, 1)
    assert position_bias_rate(comps) == 0.0


def test_unparsable_verdict_leaves_the_pair_unjudged(strong, tmp_path):
    marked = [JudgeItem(it.id, it.prompt, it.answer + " (b)", it.reference) for it in strong[:8]]

    def rule(view):  # a verdict only when B's answer is shown first
        return "[[A]]" if view.answers[0].endswith("(b)") else "I cannot decide."

    comps = compare_pairwise(RuleJudge(rule), strong[:8], marked, tmp_path, **quiet())
    for c in comps:
        assert (c.a_first, c.b_first, c.outcome) == (None, "A", None)
        assert c.error.startswith("ab: malformed") and c.raw_a_first == "I cannot decide."
    wr = win_rate(comps)
    assert (wr.rate, wr.n, wr.unjudged) == (None, 0, 8)


def test_pairwise_refuses_mismatched_items(strong, weak, tmp_path):
    with pytest.raises(ValueError, match="same item ids"):
        compare_pairwise(RuleJudge(always("A")), strong[:3], weak[1:4], tmp_path, **quiet())
    compare_pairwise(RuleJudge(always("A")), strong[:2], weak[:2], tmp_path / "done", **quiet())
    with pytest.raises(ValueError, match="finished judge phase without 1 of these items"):
        compare_pairwise(RuleJudge(always("A")), strong[:3], weak[:3], tmp_path / "done", **quiet())
    with pytest.raises(ValueError, match="appears twice"):
        as_items([strong[0], strong[0]])
    with pytest.raises(ValueError, match="needs 'prompt' and 'answer'"):
        as_items([{"id": "x", "prompt": "1+1"}])


# --------------------------------------------------------------------------- length control


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_fit_logistic_solves_the_likelihood_equations():
    """Fractional labels (ties = ½): the fit zeroes the penalized score, and agrees with a
    float64 optimizer on the plain negative log-likelihood."""
    rng = np.random.default_rng(1)
    x = np.tanh(rng.normal(0.4, 1.0, 300))
    y = rng.choice([0.0, 0.5, 1.0], size=300, p=[0.3, 0.2, 0.5])
    theta = fit_logistic(x, y, ridge=0.0)
    p = sigmoid(theta[0] + theta[1] * x)
    assert np.abs([np.sum(y - p), np.sum((y - p) * x)]).max() < 1e-9
    optimize = pytest.importorskip("scipy.optimize")

    def nll(t):
        z = t[0] + t[1] * x
        return np.sum(np.logaddexp(0, z) - y * z)

    ref = optimize.minimize(nll, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(theta, ref, atol=1e-5)


def test_fit_logistic_stays_finite_on_separable_data():
    x = np.linspace(-1, 1, 50)
    theta = fit_logistic(x, (x > 0).astype(float))
    assert np.all(np.isfinite(theta)) and theta[1] > 10


# derandomized: at n = 3000 the estimate's error is itself random, and an unlucky draw (seen once:
# 0.042 at true_rate 0.5, bias 1.0, seed 5662) must not make CI flaky; the same 8 cases every run
@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.floats(0.2, 0.8), st.floats(1.0, 3.0), st.integers(0, 2**16))
def test_length_controlled_rate_recovers_a_planted_rate(true_rate, bias, seed):
    """Model A is longer on average; the judge adds a length bonus to a true win rate. The raw
    rate is inflated; the length-controlled one recovers the true rate."""
    rng = np.random.default_rng(seed)
    n = 3000
    len_b = rng.integers(50, 300, n)
    len_a = len_b + rng.normal(120, 150, n).astype(int)
    logit = math.log(true_rate / (1 - true_rate)) + bias * length_feature(len_a, len_b)
    wins = rng.random(n) < sigmoid(logit)
    comps = [Comparison(str(i), None, None, "win" if w else "loss") for i, w in enumerate(wins)]
    lc = length_controlled_win_rate(comps, len_a, len_b, resamples=100)
    assert win_rate(comps, resamples=100).rate - true_rate > 0.05  # the planted bias shows
    assert abs(lc.rate - true_rate) < 0.04
    assert lc.lo < lc.rate < lc.hi and abs(lc.slope - bias) < 0.5


def test_length_control_needs_one_length_per_comparison():
    with pytest.raises(ValueError, match="one length per comparison"):
        length_controlled_win_rate([Comparison("1", "A", "B", "win")], [1, 2], [3])


# --------------------------------------------------------------------------- pointwise


def test_pointwise_grades_reference_guided_and_unparsed(demo, strong, problems, tmp_path):
    cut = answers(demo, problems[:16], max_new_tokens=6)  # cut off before the final answer
    items = [JudgeItem(it.id, it.prompt, it.answer, it.reference if i % 2 else None)
             for i, it in enumerate(strong[16:] + cut)]
    judge = RuleJudge(grade_by_reference)
    grades = grade_pointwise(judge, items, tmp_path, **quiet())
    expected = [None if extract_final_answer(it.answer).answer is None else
                5 if it.reference is None else 9 if is_correct(it.answer, it.reference) else 3
                for it in items]
    assert {None, 5, 9} <= set(expected)
    assert [g.score for g in grades] == expected
    for g in grades:
        if g.score is None:
            assert g.error.startswith("malformed") and "cannot grade" in g.raw
        else:
            assert g.rationale and g.error is None
    s = grade_summary(grades)
    assert s["unparsed"] == expected.count(None) and s["failed"] == 0 and s["n"] == len(items)
    assert s["mean_score"] == pytest.approx(np.mean([e for e in expected if e is not None]))
    assert s["ci95"][0] <= s["mean_score"] <= s["ci95"][1]


def test_pointwise_judge_calls_are_cached_at_the_server(server, demo, strong, tmp_path):
    """The served model judges (a bad judge: most replies carry no score). A second run with
    the cache, or in the same folder, sends the server nothing."""
    template = tmp_path / "short.j2"
    template.write_text("{{ prompt }}")  # the demo model's context is 128 tokens
    short = {"template": f"@{template}", "reference_template": "{{ prompt }}",
             "params": SamplingParams(max_new_tokens=32)}
    items = strong[:8]
    cache = ResponseCache(tmp_path / "cache.sqlite")
    before = server.stats.requests
    first = grade_pointwise(demo, items, tmp_path / "one", cache=cache, **short, **quiet())
    assert server.stats.requests - before == len(items)
    before = server.stats.requests
    again = grade_pointwise(demo, items, tmp_path / "two", cache=cache, **short, **quiet())
    same_dir = grade_pointwise(demo, items, tmp_path / "one", **short, **quiet())
    assert server.stats.requests - before == 0
    assert first == again == same_dir
    assert sum(g.score is None for g in first) == grade_summary(first)["unparsed"]


def test_pointwise_failed_judge_calls_are_counted(demo, strong, tmp_path):
    """The default rubric is longer than the demo model's context: the server refuses (HTTP
    400), and every grade is None with the reason, counted as failed, not as unparsed."""
    grades = grade_pointwise(demo, strong[:3], tmp_path, **quiet())
    assert [g.score for g in grades] == [None] * 3
    assert all(g.error.startswith("teacher_error") and "context" in g.error for g in grades)
    assert grade_summary(grades)["failed"] == 3 and grade_summary(grades)["mean_score"] is None
