"""Filters for synthetic data: each filter on crafted records, plus properties (hypothesis)."""

from __future__ import annotations

import random
import string
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from distillery.answers import equivalent as answers_equivalent
from distillery.answers import extract_final_answer
from distillery.config import TaskConfig
from distillery.elicit.filters import (
    FilterConfig,
    apply_filters,
    build_filters,
    decontaminate,
    exact_dedup,
    format_filter,
    judge_score_filter,
    length_filter,
    near_dedup,
    prompt_of,
    refusal_filter,
    response_of,
    run_filters,
    verify_filter,
)
from distillery.records import sft_record
from distillery.tasks import load_problems


def sft(id, prompt, answer, reference=None, **meta):
    return sft_record(id, prompt, answer, reference, method="labeling", teacher="t", **meta)


def pref(id, prompt, chosen, rejected="no"):
    return {
        "id": id,
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "meta": {"method": "preference"},
    }


def random_text(seed, n=300):
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase + "    ") for _ in range(n))


# --------------------------------------------------------------------------- accessors


def test_prompt_and_response_of_sft_and_preference_records():
    rec = sft("a", "2+3", "2+3=5;#5")
    rec["messages"].insert(0, {"role": "system", "content": "sys"})
    assert prompt_of(rec) == "2+3"
    assert response_of(rec) == "2+3=5;#5"
    p = pref("b", "What is 2+3?", "It is 5.")
    assert prompt_of(p) == "What is 2+3?"  # system turn is not the prompt
    assert response_of(p) == "It is 5."


# --------------------------------------------------------------------------- record filters


def test_length_filter_chars_and_tokens():
    f = length_filter(min_chars=5, max_chars=20)
    assert f(sft("a", "q", "12345")) is None
    assert f(sft("a", "q", "1234")) == "response has 4 chars, fewer than min_chars=5"
    assert f(sft("a", "q", "x" * 21)) == "response has 21 chars, more than max_chars=20"
    g = length_filter(max_tokens=3, count_tokens=lambda t: len(t.split(";")))
    assert g(sft("a", "q", "1;2;3")) is None
    assert g(sft("a", "q", "1;2;3;4")) == "response has 4 tokens, more than max_tokens=3"
    assert length_filter(min_tokens=2)(sft("a", "q", "one")) == "response has 1 tokens, fewer than min_tokens=2"


def test_format_filter():
    f = format_filter(r"#-?\d+\s*$")
    assert f.name == "format"
    assert f(sft("a", "q", "55*2=110;22+110=132;#132")) is None
    assert f(sft("a", "q", "55*2=110;22+110=")) == r"response does not match the required pattern '#-?\\d+\\s*$'"


def test_refusal_filter():
    f = refusal_filter()
    assert f(sft("a", "q", "I\u2019m sorry, but I can't help with that.")) == "refusal phrase \"i'm sorry, but\" in the response"
    assert f(sft("a", "q", "As an AI language model, ...")) == "refusal phrase 'as an ai' in the response"
    assert f(sft("a", "q", "2+3=5;#5")) is None
    # a reasoning chain that merely says "I cannot" late on is kept when only the head is checked
    late = "Let x = 3. " * 10 + "I cannot divide by zero, so x != 0."
    assert refusal_filter(head_chars=60)(sft("a", "q", late)) is None
    assert refusal_filter(["nope"])(sft("a", "q", "NOPE.")) == "refusal phrase 'nope' in the response"


def test_judge_score_filter():
    f = judge_score_filter(4.0)
    assert f(sft("a", "q", "r", scores={"judge": 4.5})) is None
    assert f(sft("a", "q", "r", scores={"judge": 3})) == "score 'judge' is 3, below min_score=4.0"
    assert f(sft("a", "q", "r")) == "no score 'judge' in meta.scores"
    assert f(sft("a", "q", "r", scores={"judge": "high"})) == "score 'judge' is not a number: 'high'"
    assert judge_score_filter(0.5, key="rm")(sft("a", "q", "r", scores={"rm": 0.7})) is None


def test_verify_filter():
    f = verify_filter()
    assert f(sft("a", "22+55*2", "55*2=110;22+110=132;#132", reference="132")) is None
    assert f(sft("a", "q", "The answer is \\boxed{\\frac{3}{4}}.", reference="0.75")) is None
    assert f(sft("a", "q", "Final answer: x^2 + x", reference="x*(x+1)")) is None
    assert f(sft("a", "q", "55*2=110;22+110=131;#131", reference="132")) == (
        "answer '131' does not match reference '132'"
    )
    assert f(sft("a", "q", "55*2=110;22+", reference="132")) == "no final answer found in the response"
    assert f(sft("a", "q", "#5")) == "no reference to verify against"
    assert verify_filter(keep_unreferenced=True)(sft("a", "q", "#5")) is None
    custom = verify_filter({"name": "regex", "pattern": r"(\S+)$"})
    assert custom(sft("a", "q", "it is 1,000", reference="1000")) is None
    # the task's grader decides: numeric does not evaluate an expression, symbolic does
    assert verify_filter("numeric")(sft("a", "q", "The answer is 78-73", reference="5")) is not None
    assert verify_filter("symbolic")(sft("a", "q", "The answer is 78-73", reference="5")) is None


def test_extract_final_answer():
    assert extract_final_answer("so \\boxed{\\frac{1}{2}} and \\boxed{7}").answer == "7"
    assert extract_final_answer("a;b;#1,024").answer == "1024"
    assert extract_final_answer("The answer is 42.").answer == "42"
    assert extract_final_answer("Work...\nFinal answer: x^2 + 1").answer == "x^2 + 1"
    assert extract_final_answer("I answered it, and the answer depends").answer is None
    assert extract_final_answer(None).answer is None


# --------------------------------------------------------------------------- answer equivalence


@pytest.mark.parametrize(
    "a, b",
    [
        ("3/4", "0.75"), ("1,000", "1000"), ("5.0", "5"), ("+5", "5"), ("-0.50", "-1/2"),
        ("1e3", "1000"), ("50%", "0.5"), ("50%", "50"), (r"\frac{3}{4}", "0.75"),
        (r"\dfrac{-3}{4}", "-0.75"), (r"\boxed{42}", "42"), ("$1,234.50$", "1234.5"),
        ("x = 3", "3"), ("Paris", "paris."), ("x*(x+1)", "x**2+x"), ("$x^2+x$", "x(x+1)"),
        ("2x", "2*x"), ("(x+1)(x-1)", "x^2 - 1"), ("sqrt(2)/2", r"\frac{1}{\sqrt{2}}"),
        (r"\pi/2", "pi/2"),
    ],
)
def test_equivalent(a, b):
    assert answers_equivalent(a, b)
    assert answers_equivalent(b, a)


@pytest.mark.parametrize(
    "a, b",
    [
        ("3/4", "0.7"), ("1,2", "12"), ("132", "131"), ("2*x", "x**2"), ("x+1", "y+1"),
        ("Paris", "London"), ("5", None), (None, None), ("0.333", "1/3"), ("1/0", "0"),
    ],
)
def test_not_equivalent(a, b):
    assert not answers_equivalent(a, b)


def test_rel_tol():
    assert answers_equivalent("0.3333", "1/3", rel_tol=1e-3)
    assert not answers_equivalent("0.33", "1/3", rel_tol=1e-3)


@pytest.mark.parametrize(
    "payload",
    [
        "__import__('os').system('touch {marker}')",
        "open('{marker}', 'w')",
        "x.__class__",
        "(lambda: 1)()",
        "eval(x)",
        "().__class__.__bases__",
        "x.n",
    ],
)
def test_malicious_input_is_never_evaluated(payload, tmp_path, monkeypatch):
    import sympy.parsing.sympy_parser as parser

    def refuse(*args, **kwargs):
        raise AssertionError("parse_expr reached with unsafe text")

    monkeypatch.setattr(parser, "parse_expr", refuse)
    marker = tmp_path / "pwned"
    text = payload.format(marker=marker)
    assert answers_equivalent(text, "0") is False
    assert answers_equivalent(text, text) is True  # identical text is equal as text, not run
    assert not marker.exists()


def test_huge_powers_give_up_fast():
    start = time.perf_counter()
    assert not answers_equivalent("9**9**9**9", "1")
    assert not answers_equivalent("((2**100)**100)**100", "1")
    assert not answers_equivalent("9^9^9", "x")
    assert time.perf_counter() - start < 2.0


numbers = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.fractions(max_denominator=1000).map(lambda f: f"{f.numerator}/{f.denominator}"),
    st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-10**6, max_value=10**6).map(str),
)


@settings(max_examples=150, deadline=None)
@given(numbers, numbers)
def test_equivalence_is_reflexive_and_symmetric(a, b):
    assert answers_equivalent(a, a)
    assert answers_equivalent(a, b) == answers_equivalent(b, a)


@settings(max_examples=150, deadline=None)
@given(st.integers(-10**15, 10**15))
def test_thousands_separators(n):
    assert answers_equivalent(str(n), f"{n:,}")
    assert answers_equivalent(f"{n:,}", f"{n}.0")
    assert not answers_equivalent(str(n), f"{n + 1:,}")


@settings(max_examples=100, deadline=None)
@given(st.fractions(min_value=-10**6, max_value=10**6, max_denominator=64))
def test_fraction_equals_its_decimal_when_exact(f):
    if 10**6 % f.denominator == 0:  # terminates within 6 places
        assert answers_equivalent(f"{f.numerator}/{f.denominator}", str(Fraction(f).limit_denominator()))
        assert answers_equivalent(f"{f.numerator}/{f.denominator}", f"{float(f):.6f}")


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="xy12+-*/^() .,%", max_size=12), st.text(alphabet="xy12+-*/^() .,%", max_size=12))
def test_equivalence_never_raises_and_is_symmetric_on_math_text(a, b):
    assert answers_equivalent(a, b) == answers_equivalent(b, a)


# --------------------------------------------------------------------------- dataset filters


def test_exact_dedup_normalizes_case_and_whitespace():
    recs = [sft("a", "What is 2+3?", "5"), sft("b", "what is  2+3?", " 5 "), sft("c", "What is 2+3?", "6")]
    kept, rejected = exact_dedup()(recs)
    assert [r["id"] for r in kept] == ["a", "c"]
    assert [(r["id"], why) for r, why in rejected] == [("b", "exact duplicate of 'a'")]


pool = ["What is 2+3?", "what is 2+3?", "WHAT IS  2+3?", "2+3", "3+2", "hello world", "Hello   World"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(pool), st.sampled_from(pool)), max_size=30))
def test_exact_dedup_has_no_duplicates_and_is_idempotent(pairs):
    recs = [sft(f"r{i}", p, a) for i, (p, a) in enumerate(pairs)]
    dedup = exact_dedup()
    kept, rejected = dedup(recs)
    keys = [" ".join((prompt_of(r) + "\n" + response_of(r)).casefold().split()) for r in kept]
    assert len(keys) == len(set(keys))
    assert len(kept) + len(rejected) == len(recs)
    again, none = dedup(kept)
    assert again == kept and none == []


def test_near_dedup_drops_copy_keeps_different():
    text = random_text(0)
    copy = text[:100] + "Q" + text[101:200] + "Z" + text[201:]
    recs = [sft("orig", "Tell me a story.", text), sft("copy", "Tell me a story.", copy),
            sft("other", "Tell me a story.", random_text(1))]
    kept, rejected = near_dedup(threshold=0.8)(recs)
    assert [r["id"] for r in kept] == ["orig", "other"]
    (rec, why), = rejected
    assert rec["id"] == "copy" and why.startswith("near duplicate of 'orig' (estimated Jaccard 0.")


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 299), st.integers(0, 299), st.sampled_from(["char", "word"]))
def test_near_dedup_property(seed, i, j, shingle):
    text = random_text(seed, 400) if shingle == "char" else " ".join(
        random_text(seed + k, 6).replace(" ", "") or "w" for k in range(120)
    )
    chars = list(text)
    for pos in (i, j):
        chars[pos] = "#"
    recs = [sft("orig", "p", text), sft("copy", "p", "".join(chars)),
            sft("other", "p", random_text(seed + 10**7, 400))]
    kept, rejected = near_dedup(threshold=0.8, shingle=shingle, ngram=5 if shingle == "char" else 2)(recs)
    assert [r["id"] for r in kept] == ["orig", "other"]
    assert [r["id"] for r, _ in rejected] == ["copy"]


def test_near_dedup_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        near_dedup(threshold=1.5)


def test_decontaminate_long_texts():
    eval_text = ("A train leaves the station at noon travelling at sixty miles per hour toward a city "
                 "two hundred miles away. When does it arrive?")
    planted = sft("bad", "Here is a warm-up. " + eval_text[:110] + " Please answer briefly.", "#3")
    clean = sft("ok", "A bus leaves the depot at nine travelling slowly toward the coast. When?", "#1")
    kept, rejected = decontaminate([planted, clean], [eval_text, "unrelated eval text"], n=13)
    assert [r["id"] for r in kept] == ["ok"]
    (rec, why), = rejected
    assert rec["id"] == "bad"
    assert why == ("prompt shares the 13-gram 'a train leaves the station at noon travelling at "
                   "sixty miles per hour' with evaluation text 0")


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([13, 5, 3]))
def test_decontaminate_catches_planted_arithmetic_problems(seed, n):
    cfg = TaskConfig(num_operands=3, digits=(1, 3), operations=["+", "-", "*"])
    evals = [p.prompt for p in load_problems(cfg, "eval", 40, seed=seed)]
    train = [p.prompt for p in load_problems(cfg, "train", 40, seed=seed)]
    planted = random.Random(seed).choice(evals)
    recs = [sft(f"t{i}", p, "#0") for i, p in enumerate(train)]
    recs.append(sft("planted", f"Quick one: {planted}. Think step by step.", "#0"))
    kept, rejected = decontaminate(recs, evals, n=n)
    if n == 13 or n == 5:  # the whole problem (5 tokens) must appear: train problems never match
        assert [r["id"] for r, _ in rejected] == ["planted"]
        assert len(kept) == len(train)
    else:  # 3-grams also flag train problems sharing e.g. "12 + 7": a coarser filter
        assert "planted" in [r["id"] for r, _ in rejected]


def test_decontaminate_checks_prompt_of_preference_records():
    kept, rejected = decontaminate([pref("p", "What is 12+7*3?", "33")], ["12+7*3"], n=13)
    assert kept == [] and rejected[0][1] == "prompt shares the 5-gram '12 + 7 * 3' with evaluation text 0"
    kept, rejected = decontaminate([pref("p", "What is 2+3?", "12+7*3")], ["12+7*3"], n=13)
    assert len(kept) == 1  # the response is not checked, only the prompt


# --------------------------------------------------------------------------- applying filters


def test_apply_filters_report_and_provenance():
    recs = [
        sft("good", "22+55*2", "55*2=110;22+110=132;#132", reference="132", seed_id="s1"),
        sft("wrong", "2+3", "2+3=6;#6", reference="5"),
        sft("refuse", "2+4", "I'm sorry, but I cannot do math.", reference="6"),
        sft("dup", "22+55*2", "55*2=110;22+110=132;#132", reference="132"),
        sft("contaminated", "Solve 7*8-1 now", "7*8=56;56-1=55;#55", reference="55"),
    ]
    report = apply_filters(
        recs, [refusal_filter(), verify_filter()], [exact_dedup()], eval_texts=["7*8-1"]
    )
    assert [r["id"] for r in report.kept] == ["good"]
    assert report.counts == {"refusal": 1, "verify": 1, "exact_dedup": 1, "decontaminate": 1}
    assert {(r["record"]["id"], r["filter"]) for r in report.rejected} == {
        ("refuse", "refusal"), ("wrong", "verify"), ("dup", "exact_dedup"),
        ("contaminated", "decontaminate"),
    }
    meta = report.kept[0]["meta"]
    assert meta["seed_id"] == "s1" and meta["method"] == "labeling"
    assert meta["filters"] == ["refusal", "verify", "exact_dedup", "decontaminate"]
    assert "filters" not in recs[0]["meta"]  # inputs are not modified
    assert report.to_dict() == {"total": 5, "kept": 1, "rejected": report.counts}
    assert "decontaminate  rejected 1" in report.summary() and "1 of 5" in report.summary()
    # filters applied later append to the provenance already there
    again = apply_filters(report.kept, [length_filter(max_chars=100)])
    assert again.kept[0]["meta"]["filters"][-1] == "length"


def test_apply_filters_plain_callables_and_unique_names():
    def short(rec):
        return "too short" if len(response_of(rec)) < 3 else None

    report = apply_filters([sft("a", "q", "ab"), sft("b", "q", "abc")], [short])
    assert report.counts == {"short": 1} and report.rejected[0]["reason"] == "too short"
    with pytest.raises(ValueError, match="unique"):
        apply_filters([], [length_filter(), length_filter()])


def test_filter_config_and_build_filters():
    cfg = FilterConfig()
    record_filters, dataset_filters = build_filters(cfg)
    assert [f.name for f in record_filters] == ["refusal"]
    assert [f.name for f in dataset_filters] == ["exact_dedup", "near_dedup"]
    cfg = FilterConfig(min_chars=2, max_chars=500, require_pattern=r"#-?\d+", verify=True,
                       min_judge_score=3, near_dedup_threshold=None, decontaminate_n=5)
    record_filters, dataset_filters = build_filters(cfg, eval_texts=["1+1"])
    assert [f.name for f in record_filters] == ["length", "format", "refusal", "judge_score", "verify"]
    assert [f.name for f in dataset_filters] == ["exact_dedup", "decontaminate"]
    with pytest.raises(ValidationError, match="require_pattern"):
        FilterConfig(require_pattern="(")
    with pytest.raises(ValidationError):
        FilterConfig(dedupe=True)  # unknown key
    with pytest.raises(ValidationError, match="min_chars"):
        FilterConfig(min_chars=10, max_chars=5)


def test_run_filters_on_preference_records():
    text = random_text(3)
    recs = [pref("p1", "Tell a story", text), pref("p2", "Tell a story", text[:-1] + "#"),
            pref("p3", "Tell a story", "As an AI, I will not."), pref("p4", "Other", random_text(4))]
    report = run_filters(recs, FilterConfig(near_dedup_threshold=0.8))
    assert [r["id"] for r in report.kept] == ["p1", "p4"]
    assert report.counts == {"refusal": 1, "exact_dedup": 0, "near_dedup": 1}
    assert all(r["meta"]["filters"] == ["refusal", "exact_dedup", "near_dedup"] for r in report.kept)
