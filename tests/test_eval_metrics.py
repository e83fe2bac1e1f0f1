"""Metrics over samples and models: pass@k against enumeration and against the unbiased
estimator written out in float64, multiple choice on a tiny model against a float64 loop, and
the statistics (bootstrap against the binomial case, seeds aggregated over two levels, minimum
detectable differences by simulation). Grading one answer is tested in test_answers.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.evaluate.metrics import multiple_choice_loglik, pass_at_1, pass_at_k
from distillery.evaluate.stats import (
    aggregate_over_seeds,
    bootstrap_ci,
    items_needed,
    min_detectable_difference,
)

# --------------------------------------------------------------------------- pass@k


def test_pass_at_1_by_hand():
    samples = [[True, False, True, True], [False] * 4, [True] * 4, [False, True, False, False]]
    assert pass_at_1(samples) == pytest.approx([0.75, 0.0, 1.0, 0.25])
    assert np.mean(pass_at_1(samples)) == pytest.approx((3 + 0 + 4 + 1) / 16)
    with pytest.raises(ValueError, match="item 1 has no samples"):
        pass_at_1([[True], []])


def test_pass_at_k_against_the_unbiased_estimator_in_float64():
    """n=5 samples, c=2 correct: pass@k = 1 - C(n-c, k)/C(n, k), written with float64 factorials
    (pass@1 = 0.4, pass@2 = 0.7, pass@3 = 0.9, pass@4 = pass@5 = 1)."""
    def comb(a: int, b: int) -> np.float64:
        if b > a:
            return np.float64(0.0)
        fact = [np.float64(1.0)]
        for i in range(1, a + 1):
            fact.append(fact[-1] * np.float64(i))
        return fact[a] / (fact[b] * fact[a - b])

    n, c = 5, 2
    samples = [True, False, True, False, False]
    for k in range(1, n + 1):
        expected = np.float64(1.0) - comb(n - c, k) / comb(n, k)
        assert pass_at_k([samples], k)[0] == pytest.approx(float(expected), abs=1e-15)
    assert [pass_at_k([samples], k)[0] for k in range(1, 6)] == pytest.approx([0.4, 0.7, 0.9, 1.0, 1.0])


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
