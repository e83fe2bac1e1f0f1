"""Pitfall checks: planted contamination found exactly, eval-size warnings that agree with the
paired bootstrap, format failures apart from wrong answers, judge position bias, the report block."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.config import TaskConfig
from distillery.elicit.filters import decontaminate, record_text
from distillery.evaluate.pitfalls import (
    check_contamination,
    check_eval_size,
    check_format_failures,
    check_position_bias,
    format_counts,
    format_pitfalls,
    ngram_overlap,
    run_pitfall_checks,
)
from distillery.evaluate.stats import paired_bootstrap_diff
from distillery.records import sft_record
from distillery.tasks import load_problems

ARITH = TaskConfig(num_operands=3, digits=(1, 2), operations=["+", "-"])


def sft(i: int, prompt: str, answer: str) -> dict:
    return sft_record(f"r{i}", prompt, answer, None, method="labeling", teacher="t")


def arithmetic_split(n_train: int = 300, n_eval: int = 100) -> tuple[list[dict], dict[str, str]]:
    """Synthetic records on train problems (prompt + chain) and the held-out problems by id."""
    train = load_problems(ARITH, "train", n_train, seed=0)
    evals = load_problems(ARITH, "eval", n_eval, seed=0)
    records = [sft(i, p.prompt, p.chain) for i, p in enumerate(train)]
    return records, {p.id: p.prompt for p in evals}


# --------------------------------------------------------------------------- contamination


def test_clean_split_flags_nothing():
    records, evals = arithmetic_split()
    pitfalls = run_pitfall_checks(train_records=records, eval_items=evals)
    [p] = pitfalls
    assert p.kind == "contamination" and p.severity == "ok"
    assert p.figures["contaminated"] == 0 and p.figures["flagged"] == []
    assert p.figures["items"] == len(evals)


@pytest.mark.parametrize("k", [1, 7])
def test_planted_eval_problems_are_exactly_the_flagged_ones(k):
    records, evals = arithmetic_split()
    planted = random.Random(k).sample(sorted(evals), k)
    # the teacher restating an eval problem inside its reasoning counts as much as a prompt
    for j, item_id in enumerate(planted):
        rec = records[j * 11]
        rec["messages"][-1]["content"] = f"Like {evals[item_id]} earlier: " + rec["messages"][-1]["content"]
    p = check_contamination((record_text(r) for r in records), evals)
    assert p.severity == "warning"
    assert sorted(p.figures["flagged"]) == sorted(planted)
    assert p.figures["share"] == pytest.approx(k / len(evals))
    overlap = dict(zip(evals, p.figures["overlap"]))
    assert all(overlap[i] == 1.0 for i in planted)  # short items are one whole gram
    assert sum(o > 0 for o in overlap.values()) == k
    assert "share a 13-gram" in p.message and planted[0] in p.message


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(words))


def test_long_items_need_a_whole_n_gram_and_report_the_shared_fraction():
    rng = random.Random(0)
    evals = [_sentence(rng, 40) for _ in range(20)]
    train = [_sentence(rng, 200) for _ in range(50)]
    words = evals[3].split()
    train[5] += " " + " ".join(words[10:23])  # 13 words of item 3: one shared 13-gram
    train[9] += " " + " ".join(words[25:37])  # 12 more words of item 3: a 12-gram only
    train[12] += " " + " ".join(evals[7].split()[:20])  # 20 words of item 7: 8 shared 13-grams
    p = check_contamination(train, evals, n=13)
    assert p.figures["flagged"] == [3, 7]
    assert p.figures["overlap"][3] == pytest.approx(1 / 28)  # 40 - 13 + 1 = 28 grams
    assert p.figures["overlap"][7] == pytest.approx(8 / 28)
    at_12 = check_contamination(train, evals, n=12).figures
    assert at_12["flagged"] == [3, 7]
    assert at_12["overlap"][3] == pytest.approx(3 / 29)  # 2 grams in words 10..22, 1 in 25..36
    assert at_12["overlap"][7] == pytest.approx(9 / 29)
    # the share threshold: 2 of 20 flagged warns at 5%, not at 10%
    assert check_contamination(train, evals, threshold=0.05).warning
    assert not check_contamination(train, evals, threshold=0.1).warning


def _reference_overlap(train: list[str], item: str, n: int) -> float:
    """The plain way: each gram of the item (whole item when shorter) searched in each text."""
    toks = item.split()
    if not toks:
        return 0.0
    size = min(n, len(toks))
    grams = {tuple(toks[i : i + size]) for i in range(len(toks) - size + 1)}
    windows = {tuple(t.split()[i : i + size]) for t in train for i in range(len(t.split()) - size + 1)}
    return len(grams & windows) / len(grams)


texts = st.lists(st.sampled_from(["a", "b", "c"]), min_size=0, max_size=12).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(train=st.lists(texts, max_size=6), evals=st.lists(texts, min_size=1, max_size=5),
       n=st.integers(1, 5))
def test_overlap_matches_plain_reference_and_the_decontamination_filter(train, evals, n):
    overlap = ngram_overlap(train, evals, n)
    assert overlap == pytest.approx([_reference_overlap(train, e, n) for e in evals])
    records = [sft(i, t, "ok") for i, t in enumerate(train)]
    for item, o in zip(evals, overlap):
        # the generate stage's filter (on prompts) rejects a record iff this item is flagged
        _, rejected = decontaminate(records, [item], n)
        assert (o > 0) == bool(rejected)


def test_contamination_rejects_bad_input():
    with pytest.raises(ValueError, match="n must be >= 1"):
        check_contamination(["a b"], ["a b"], n=0)
    with pytest.raises(ValueError, match="at least one eval item"):
        check_contamination(["a b"], [])
    with pytest.raises(ValueError, match="threshold"):
        check_contamination(["a b"], ["a"], threshold=1.5)


# --------------------------------------------------------------------------- eval size


def paired(n: int, n10: int, n01: int, both: int) -> tuple[list[float], list[float]]:
    """Per-item 0/1 outcomes: n10 items only A gets right, n01 only B, ``both`` both."""
    a = [1.0] * n10 + [0.0] * n01 + [1.0] * both
    b = [0.0] * n10 + [1.0] * n01 + [1.0] * both
    rest = n - len(a)
    return a + [0.0] * rest, b + [0.0] * rest


@pytest.mark.parametrize("n, warns", [(160, True), (400, False)])
def test_eval_size_warning_agrees_with_paired_bootstrap(n, warns):
    # same shares at both sizes: A right alone on 10%, B alone on 5%, both on 50%
    a, b = paired(n, n // 10, n // 20, n // 2)
    disc = (n // 10 + n // 20) / n
    p = check_eval_size(n, sum(a) / n, sum(b) / n, discordance=disc, names=("teacher", "student"))
    assert p.warning is warns
    assert p.figures["min_detectable"] == pytest.approx(1.959963984540054 * math.sqrt(disc / n))
    assert p.figures["difference"] == pytest.approx(0.05)
    # the warning means exactly "the difference's 95% interval includes 0"
    _, lo, hi = paired_bootstrap_diff(a, b, resamples=20000)
    assert (lo <= 0 <= hi) is warns
    # at n_needed items (same shares) the difference is resolved
    need = p.figures["n_needed"]
    assert check_eval_size(need, sum(a) / n, sum(b) / n, discordance=disc).severity == "ok"
    assert check_eval_size(need - 2, sum(a) / n, sum(b) / n, discordance=disc).warning


def test_eval_size_without_per_item_results_assumes_independent_errors():
    p = check_eval_size(100, 0.50, 0.52)
    assert p.warning and p.message.startswith("a vs b")
    assert p.figures["discordance"] == pytest.approx(0.5 * 0.48 + 0.52 * 0.5)
    assert p.figures["min_detectable"] > 0.13  # 100 items cannot tell 50% from 52%
    assert not check_eval_size(10_000, 0.50, 0.60).warning
    identical = check_eval_size(50, 0.7, 0.7, discordance=0.0)
    assert not identical.warning and identical.figures["n_needed"] is None
    with pytest.raises(ValueError, match="accuracy of a"):
        check_eval_size(10, 1.5, 0.2)


# --------------------------------------------------------------------------- format failures


def items(correct: int, wrong: int, none: int) -> list[dict]:
    """Items q0, q1, ...: the first ``correct`` right, then ``wrong`` wrong, then no answer."""
    kinds = [("1", True)] * correct + [("2", False)] * wrong + [(None, False)] * none
    return [{"id": f"q{i}", "answer": a, "correct": c} for i, (a, c) in enumerate(kinds)]


def test_format_failures_are_counted_apart_from_wrong_answers():
    teacher = {"items": items(90, 8, 2)}
    student = {"items": items(40, 20, 40)}
    counts = {"teacher": format_counts(teacher), "student": format_counts(student)}
    assert counts["teacher"] == {"n": 100, "correct": 90, "wrong": 8, "no_answer": 2}
    assert counts["student"] == {"n": 100, "correct": 40, "wrong": 20, "no_answer": 40}
    p = check_format_failures(counts, threshold=0.05)
    assert p.warning and "student" in p.message and "teacher" not in p.message
    assert p.figures["models"]["student"]["format_share_of_failures"] == pytest.approx(40 / 60)
    assert p.figures["models"]["teacher"]["no_answer_share"] == pytest.approx(0.02)
    assert not check_format_failures(counts, threshold=0.5).warning
    with pytest.raises(ValueError, match="'student' are inconsistent"):
        check_format_failures({"student": {"n": 10, "no_answer": 8, "wrong": 5}})
    with pytest.raises(ValueError, match="lack"):
        check_format_failures({"student": {"n": 10}})


def test_position_bias_threshold():
    assert check_position_bias(0.35, n=40).warning
    assert "35.0%" in check_position_bias(0.35, n=40).message
    assert not check_position_bias(0.1).warning
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        check_position_bias(1.2)


# --------------------------------------------------------------------------- all checks and the report


def test_run_pitfall_checks_and_report_block():
    records, evals = arithmetic_split(100, 40)
    planted = sorted(evals)[0]
    records.append(sft(999, evals[planted], "#0"))
    models = {"teacher": {"items": items(30, 8, 2)}, "student": {"items": items(28, 2, 10)}}
    pitfalls = run_pitfall_checks(models=models, train_records=records, eval_items=evals,
                                  position_bias_rate=0.05, position_bias_n=40)
    kinds = [p.kind for p in pitfalls]
    assert kinds == ["contamination", "eval_size", "format_failures", "position_bias"]
    by_kind = {p.kind: p for p in pitfalls}
    assert by_kind["contamination"].figures["flagged"] == [planted]
    assert by_kind["eval_size"].warning  # 75% vs 70% on 40 items, 2 discordant
    assert by_kind["eval_size"].figures["n"] == 40
    assert by_kind["eval_size"].figures["discordance"] == pytest.approx(2 / 40)
    assert by_kind["format_failures"].warning and not by_kind["position_bias"].warning
    md = format_pitfalls(pitfalls)
    assert md.startswith("## Pitfall checks")
    assert md.count("> **Warning") == 3
    assert md.index("Warning (contamination)") < md.index("Passed:") < md.index("position bias:")
    assert all(isinstance(p.to_dict()["figures"], dict) for p in pitfalls)
    assert "No pitfall checks ran" in format_pitfalls([])
