"""Ground-truth metrics: answer extraction on crafted (and adversarial) outputs, exact match /
token F1 properties, numeric and symbolic equivalence, pass@k against enumeration, multiple
choice on a tiny model against a float64 loop, and the statistics (bootstrap against the
binomial case, seeds aggregated over two levels, minimum detectable differences by simulation).
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.evaluate.extract import extract_final_answer
from distillery.evaluate.metrics import (
    exact_match,
    multiple_choice_loglik,
    normalize_text,
    numeric_match,
    pass_at_1,
    pass_at_k,
    score_item,
    symbolic_match,
    token_f1,
)
from distillery.evaluate.stats import (
    aggregate_over_seeds,
    bootstrap_ci,
    items_needed,
    min_detectable_difference,
)
from distillery.tasks import extract_answer, is_correct

# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("output", "answer", "how"),
    [
        # boxed: the last one, nested braces whole, LaTeX turned into plain math
        (r"First \boxed{3}, then corrected: \boxed{\frac{3}{4}}.", "3/4", "boxed"),
        (r"$\boxed{\dfrac{1}{2}}$", "1/2", "boxed"),
        (r"\boxed{x^{2} + \frac{1}{x}}", "x^2 + 1/(x)", "boxed"),
        (r"\boxed{\frac{1}{x^{2}}}", "1/(x^2)", "boxed"),  # braces inside a fraction
        (r"\boxed{\left( 3, 4 \right)}", "( 3, 4 )", "boxed"),
        (r"\boxed{\text{14 apples}}", "14", "boxed"),
        (r"\boxed{-\frac{7}{2}} and the answer is 5", "-7/2", "boxed"),
        # "the answer is" / "Answer:": the last marker decides, units and punctuation go
        ("3+4=7, 7*2=14, so the answer is 14. Check: 14/2=7, 7-3=4.", "14", "answer_is"),
        ("The answer is 12. Wait, 3*5 is 15, not 12. The answer is 15.", "15", "answer_is"),
        ("The answer is 12, since 3*4 = 12 and 12 > 10.", "12", "answer_is"),
        ("She has 42 apples. The answer is 42 apples.", "42", "answer_is"),
        ("The total is 3 + 2 = 5 dollars, so the answer is $5.00.", "5.00", "answer_is"),
        ("Out of 20, 15 passed: the answer is 75%.", "75%", "answer_is"),
        ("the answer is 75 percent", "75%", "answer_is"),
        ("Area = 3 * 1 so the answer is 3 cm^2", "3", "answer_is"),
        ("The answer is \u22125", "-5", "answer_is"),  # unicode minus
        ("The answer is 1,234,567.", "1234567", "answer_is"),
        ("Answer: 1{,}000", "1000", "answer_is"),
        ("**Answer:** 42", "42", "answer_is"),
        ("The final answer is **-8**.", "-8", "answer_is"),
        (r"The answer is $\frac{3}{4}$.", "3/4", "answer_is"),
        (r"answer: \(x = -\frac{1}{2}\)", "-1/2", "answer_is"),
        (r"The answer is 2\sqrt{3}.", "2sqrt(3)", "answer_is"),
        ("The answer is (1, 2).", "(1, 2)", "answer_is"),
        ("The answer is Paris.", "Paris", "answer_is"),
        (r"The angle is 90^\circ, so the answer is 90^\circ", "90", "answer_is"),
        # GSM8K and our own format
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", "hash"),
        ("55*2=110;22+110=132;#132", "132", "hash"),
        ("5-12=-7;#\u22127<|end|>", "-7", "hash"),
        # final line: only a bare number (units allowed), fraction or whole-line formula
        ("Step 1: 3+4=7\nStep 2: 7*2=14\n14", "14", "final_line"),
        ("Counting them:\n42 apples.", "42", "final_line"),
        ("So we get\n$$\\frac{7}{2}$$", "7/2", "final_line"),
    ],
)
def test_extract_crafted_outputs(output, answer, how):
    found = extract_final_answer(output)
    assert (found.answer, found.how) == (answer, how)


@pytest.mark.parametrize(
    "output",
    [
        "", "   \n ", None, "I don't know.",
        "3+4=7 and 7*2=14 and then",  # a chain cut off: several numbers, none stated as answer
        "12+3=15;15-",
        "# Step 2\nwe multiply 3 by 5 and get 15 which we",
        "The result is 42 apples and 3 pears",  # a sentence ending in a number is not bare
        r"The answer is \boxed{}",
    ],
)
def test_extract_no_answer(output):
    found = extract_final_answer(output)
    assert found.answer is None and found.how == "none"


@settings(max_examples=60, deadline=None)
@given(
    answer=st.integers(-(10**9), 10**9),
    noise=st.lists(st.integers(-999, 999), min_size=0, max_size=6),
    style=st.sampled_from(["answer_is", "boxed", "hash", "gsm8k"]),
    commas=st.booleans(),
    unicode_minus=st.booleans(),
)
def test_extract_any_integer_after_a_chain_of_other_numbers(answer, noise, style, commas, unicode_minus):
    text = f"{answer:,}" if commas else str(answer)
    if unicode_minus:
        text = text.replace("-", "\u2212")
    chain = " ".join(f"then {a} + {b} = {a + b}." for a, b in zip(noise, noise[1:]))
    marker = {"answer_is": f"So the answer is {text}.", "boxed": f"Thus $\\boxed{{{text}}}$.",
              "hash": f";#{text}", "gsm8k": f"\n#### {text}"}[style]
    found = extract_final_answer(chain + " " + marker)
    assert found.answer == str(answer)
    assert numeric_match(found.answer, str(answer))


def test_task_extractor_is_unchanged_and_agrees_on_its_format():
    for output, ref in [("55*2=110;22+110=132;#132", "132"), ("The answer is 1,234.", "1234")]:
        assert extract_answer(output) == ref and is_correct(output, ref)
        assert extract_final_answer(output).answer == ref
    assert extract_answer("15") is None  # the task keeps its stricter rule


# --------------------------------------------------------------------------- text metrics


def test_normalize_text_squad_rules_and_numbers():
    assert normalize_text("The  Eiffel-Tower!") == "eiffel tower"
    assert normalize_text("an Apple, a pear") == "apple pear"
    assert exact_match("the Eiffel Tower.", "Eiffel tower")
    assert not exact_match("-5", "5") and not exact_match("5.5", "55")
    assert exact_match("\u22125", "-5")
    assert not exact_match(None, "x")


_words = st.lists(st.sampled_from(["the", "a", "Cat", "cat", "sat", "mat", "on", "5", "-5", "5.5", "!", ","]),
                  max_size=8).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(_words, _words, st.text(max_size=20))
def test_exact_match_symmetric_and_reflexive(a, b, junk):
    assert exact_match(a, b) == exact_match(b, a)
    assert exact_match(a, a) and exact_match(junk, junk)
    assert exact_match(a, b) == (token_f1(a, b) == 1.0 and normalize_text(a) == normalize_text(b))


@settings(max_examples=200, deadline=None)
@given(_words, _words, st.randoms(use_true_random=False))
def test_token_f1_bounds_and_multiset(a, b, rnd):
    f1 = token_f1(a, b)
    assert 0.0 <= f1 <= 1.0
    assert f1 == pytest.approx(token_f1(b, a))
    same = Counter(normalize_text(a).split()) == Counter(normalize_text(b).split())
    assert (f1 == 1.0) == same
    shuffled = normalize_text(a).split()
    rnd.shuffle(shuffled)
    assert token_f1(" ".join(shuffled), a) == 1.0


def test_token_f1_hand_computed():
    # pred tokens: eiffel tower in paris (4); ref: eiffel tower (2); common 2
    p, r = 2 / 4, 2 / 2
    assert token_f1("The Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(2 * p * r / (p + r))
    assert token_f1("cat cat cat", "cat") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1(None, "x") == 0.0


# --------------------------------------------------------------------------- math metrics


@pytest.mark.parametrize(
    ("pred", "ref", "numeric", "symbolic"),
    [
        ("3/4", "0.75", True, True),
        (r"\frac{3}{4}", "0.75", True, True),
        ("1,000", "1000.0", True, True),
        ("75%", "0.75", True, True),
        ("-5", "5", False, False),
        ("x^2+x", "x*(x+1)", False, True),
        ("2sqrt(3)", r"\sqrt{12}", False, True),
        ("abc", "abc", False, True),  # same text: not a number, but equivalent
        (None, "1", False, False),
    ],
)
def test_numeric_and_symbolic_match(pred, ref, numeric, symbolic):
    assert numeric_match(pred, ref) is numeric
    assert symbolic_match(pred, ref) is symbolic


def test_numeric_match_relative_tolerance():
    assert not numeric_match("3.14159", "3.1416")
    assert numeric_match("3.14159", "3.1416", rel_tol=1e-4)


def test_score_item_keeps_format_failures_apart():
    assert score_item("so the answer is \u221214.", "-14").status == "correct"
    wrong = score_item("3*5=15, so the answer is 16.", "15")
    assert (wrong.status, wrong.answer, wrong.score) == ("wrong", "16", 0.0)
    cut = score_item("3*5=15, and then 15+", "15")
    assert (cut.status, cut.answer, cut.how) == ("no_answer", None, "none")
    # short-answer QA: the whole reply is the answer for text metrics
    assert score_item("Paris", "paris", "exact_match").status == "correct"
    partial = score_item("The answer is Paris France", "Paris", "token_f1")
    assert partial.status == "wrong" and partial.score == pytest.approx(2 / 3)
    assert score_item("", "Paris", "token_f1").status == "no_answer"
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score_item("1", "1", "bleu")


# --------------------------------------------------------------------------- pass@k


def test_pass_at_1_by_hand():
    samples = [[True, False, True, True], [False] * 4, [True] * 4, [False, True, False, False]]
    assert pass_at_1(samples) == pytest.approx([0.75, 0.0, 1.0, 0.25])
    assert np.mean(pass_at_1(samples)) == pytest.approx((3 + 0 + 4 + 1) / 16)
    with pytest.raises(ValueError, match="item 1 has no samples"):
        pass_at_1([[True], []])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=7), st.integers(1, 7))
def test_pass_at_k_equals_enumerating_every_k_subset(samples, k):
    if k > len(samples):
        with pytest.raises(ValueError, match=f"pass@{k}"):
            pass_at_k([samples], k)
        return
    subsets = list(itertools.combinations(samples, k))
    expected = sum(any(s) for s in subsets) / len(subsets)
    assert pass_at_k([samples], k)[0] == pytest.approx(expected)


# --------------------------------------------------------------------------- multiple choice


@pytest.fixture(scope="module")
def tiny_lm(tiny_tokenizer):
    """A 1-layer Llama trained a few dozen steps on '12+7=19', so '19' is the likely option."""
    from distillery.config import ModelConfig
    from distillery.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, device="cpu"), tiny_tokenizer)
    ids = torch.tensor([tiny_tokenizer("12+7=19")["input_ids"]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, first, loss.item()


def _reference_logliks(model, tokenizer, prompt, options):
    """Float64, one option at a time, log p summed token by token in a plain loop."""
    ref = []
    model64 = type(model)(model.config).double()
    model64.load_state_dict(model.state_dict())
    n_ctx = len(tokenizer(prompt)["input_ids"])
    for option in options:
        ids = tokenizer(prompt + option)["input_ids"]
        with torch.no_grad():
            logits = model64(input_ids=torch.tensor([ids])).logits[0]
        total = 0.0
        for t in range(n_ctx, len(ids)):
            total += float(torch.log_softmax(logits[t - 1], dim=-1)[ids[t]])
        ref.append(total)
    return ref


def test_multiple_choice_picks_the_learned_option(tiny_lm, tiny_tokenizer, one_thread):
    model, loss_before, loss_after = tiny_lm
    assert loss_after < 0.1 * loss_before, (loss_before, loss_after)
    options = ["25", "19", "3", "190"]
    best, logliks, normalized = multiple_choice_loglik(model, tiny_tokenizer, "12+7=", options)
    assert best == 1
    assert np.exp(logliks[1]) > 0.5  # the model is near-certain of the option it learned
    assert logliks == pytest.approx(_reference_logliks(model, tiny_tokenizer, "12+7=", options), abs=1e-4)
    assert normalized == pytest.approx([ll / len(o) for ll, o in zip(logliks, options)])
    assert multiple_choice_loglik(model, tiny_tokenizer, "12+7=", options, select="normalized").best_index == 1


def test_multiple_choice_random_model_matches_the_loop(tiny_tokenizer, one_thread):
    from distillery.config import ModelConfig
    from distillery.models import build_model

    torch.manual_seed(1)
    model = build_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, device="cpu"), tiny_tokenizer).eval()
    options = [" yes", " no", " maybe so", "3"]
    res = multiple_choice_loglik(model, tiny_tokenizer, "Is 2+2=4?", options)
    ref = _reference_logliks(model, tiny_tokenizer, "Is 2+2=4?", options)
    assert res.logliks == pytest.approx(ref, abs=1e-4)
    assert res.best_index == int(np.argmax(ref))
    with pytest.raises(ValueError, match="option 1"):
        multiple_choice_loglik(model, tiny_tokenizer, "x", ["a", ""])


# --------------------------------------------------------------------------- statistics


def test_bootstrap_ci_against_the_binomial_case():
    """n=400, p=0.3: width ≈ 2·1.96·sqrt(p(1-p)/n), and the 95% interval covers p ~95% of the time."""
    n, p = 400, 0.3
    rng = np.random.default_rng(0)
    widths, covered = [], 0
    for k in range(200):
        x = (rng.random(n) < p).astype(float)
        mean, lo, hi = bootstrap_ci(x, resamples=2000, seed=k)
        widths.append(hi - lo)
        covered += lo <= p <= hi
        assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(mean * (1 - mean) / n), rel=0.1)
    assert np.mean(widths) == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / n), rel=0.1)
    assert abs(covered / 200 - 0.95) <= 0.04, covered


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=60), st.floats(-5, 5))
def test_bootstrap_ci_of_floats_moves_with_a_shift(values, shift):
    mean, lo, hi = bootstrap_ci(values, resamples=300, seed=3)
    smean, slo, shi = bootstrap_ci([v + shift for v in values], resamples=300, seed=3)
    assert lo <= mean + 1e-12 <= hi + 2e-12
    assert (smean, slo, shi) == pytest.approx((mean + shift, lo + shift, hi + shift), abs=1e-9)


def test_bootstrap_ci_refuses_nan_and_empty():
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.5, float("nan")])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


def _crossed(rng, n_seeds, n_items, sd_seed, sd_item, sd_noise):
    """Scores mu + seed effect + item effect + noise, mu = 0.5: seeds and items crossed."""
    return (0.5 + rng.normal(0, sd_seed, (n_seeds, 1)) + rng.normal(0, sd_item, (1, n_items))
            + rng.normal(0, sd_noise, (n_seeds, n_items)))


def test_seeds_and_items_both_count_in_the_interval():
    """Noisy seeds: the two-level interval covers the true mean; items alone do not."""
    rng = np.random.default_rng(0)
    both = items_only = 0
    for k in range(100):
        x = _crossed(rng, 20, 100, sd_seed=0.15, sd_item=0.2, sd_noise=0.3)
        agg = aggregate_over_seeds(x, resamples=1000, seed=k)
        assert agg.mean == pytest.approx(x.mean()) and agg.seed_means == pytest.approx(x.mean(axis=1))
        both += agg.lo <= 0.5 <= agg.hi
        _, lo, hi = bootstrap_ci(x.mean(axis=0), resamples=1000, seed=k)
        items_only += lo <= 0.5 <= hi
    assert both >= 88, both
    assert items_only <= 80, items_only


def test_nested_seeds_with_their_own_items():
    rng = np.random.default_rng(1)
    covered = 0
    for k in range(60):
        rows = [0.5 + rng.normal(0, 0.1) + rng.normal(0, 0.3, rng.integers(50, 80)) for _ in range(15)]
        agg = aggregate_over_seeds(rows, resamples=1000, seed=k, same_items=False)
        covered += agg.lo <= 0.5 <= agg.hi
    assert covered >= 52, covered  # >= ~87% of 60
    with pytest.raises(ValueError, match="same_items=False"):
        aggregate_over_seeds([[1.0, 0.0], [1.0]])


def test_one_seed_is_the_item_bootstrap():
    x = (np.random.default_rng(2).random(300) < 0.6).astype(float)
    agg = aggregate_over_seeds([x], resamples=4000)
    _, lo, hi = bootstrap_ci(x, resamples=4000)
    assert agg.hi - agg.lo == pytest.approx(hi - lo, rel=0.1)


def _z_test_rejects(d: np.ndarray) -> bool:
    se = d.std(ddof=1) / np.sqrt(d.size)
    return se > 0 and abs(d.mean()) / se > 1.959964


def test_min_detectable_difference_has_its_power_unpaired():
    n, p = 300, 0.5
    mdd = min_detectable_difference(n, p)
    assert mdd == pytest.approx((1.959964 + 0.841621) * np.sqrt(2 * p * (1 - p) / n), rel=1e-5)
    rng = np.random.default_rng(0)
    rejected = 0
    for _ in range(1000):
        a = (rng.random(n) < p + mdd / 2).astype(float)
        b = (rng.random(n) < p - mdd / 2).astype(float)
        se = np.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
        rejected += abs(a.mean() - b.mean()) / se > 1.959964
    assert abs(rejected / 1000 - 0.8) < 0.04, rejected


def test_min_detectable_difference_has_its_power_paired():
    n, disc = 400, 0.2  # the models disagree on 20% of items
    mdd = min_detectable_difference(n, paired=True, discordance=disc)
    assert mdd < min_detectable_difference(n, 0.5)  # pairing resolves smaller differences
    rng = np.random.default_rng(1)
    q_a, q_b = (disc + mdd) / 2, (disc - mdd) / 2  # P(only A right), P(only B right)
    rejected = sum(_z_test_rejects(rng.choice([1.0, -1.0, 0.0], size=n, p=[q_a, q_b, 1 - disc]))
                   for _ in range(1000))
    assert abs(rejected / 1000 - 0.8) < 0.05, rejected
    # power 0.5: the half-width of the difference's 95% interval
    assert min_detectable_difference(n, paired=True, discordance=disc, power=0.5) == pytest.approx(
        1.959964 * np.sqrt(disc / n), rel=1e-5)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.005, 0.5), st.floats(0.05, 0.95), st.booleans())
def test_items_needed_inverts_the_detectable_difference(diff, p, paired):
    kw = {"paired": paired, "discordance": 0.3 if paired else None}
    n = items_needed(diff, p, **kw)
    assert min_detectable_difference(n, p, **kw) <= diff + 1e-12
    assert n == 1 or min_detectable_difference(n - 1, p, **kw) > diff


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="p is an accuracy"):
        min_detectable_difference(100, 1.5)
    with pytest.raises(ValueError, match="positive number of items"):
        min_detectable_difference(0)
    with pytest.raises(ValueError, match="discordance"):
        min_detectable_difference(100, paired=True, discordance=2.0)
