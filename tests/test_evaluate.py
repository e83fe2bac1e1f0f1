"""Bootstrap intervals and the model evaluation record."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.config import EvalConfig
from distillery.evaluate import bootstrap_ci, bootstrap_ratio, evaluate_model, paired_bootstrap_diff
from distillery.tasks import Problem
from distillery.teachers import HFTeacher


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=200), st.integers(0, 1000))
def test_interval_contains_the_mean(values, seed):
    mean, lo, hi = bootstrap_ci(values, resamples=500, seed=seed)
    assert mean == pytest.approx(float(np.mean(values)))
    assert lo <= mean + 1e-12 and mean <= hi + 1e-12
    assert 0.0 <= lo <= hi <= 1.0


def test_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    x = (rng.random(2000) < 0.3).astype(float)
    mean, lo, hi = bootstrap_ci(x, resamples=4000)
    se = np.sqrt(mean * (1 - mean) / len(x))
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_paired_difference_is_narrower_than_unpaired():
    rng = np.random.default_rng(1)
    a = (rng.random(500) < 0.5).astype(float)
    b = a.copy()
    flip = rng.random(500) < 0.1
    b[flip] = 1 - b[flip]
    diff, lo, hi = paired_bootstrap_diff(a, b, resamples=2000)
    _, alo, ahi = bootstrap_ci(a, resamples=2000)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert hi - lo < ahi - alo
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap_diff(a, b[:-1])


def test_evaluate_model_scores_and_counts_format_failures(tiny_model_dir):
    teacher = HFTeacher.from_pretrained(tiny_model_dir, device="cpu")
    problems = [Problem(id=str(i), prompt=f"{i}+1", reference=str(i + 1)) for i in range(6)]
    cfg = EvalConfig(num_problems=6, batch_size=3, max_new_tokens=5, bootstrap_resamples=200, speed_prompts=2)
    res = evaluate_model(teacher, problems, cfg)
    assert res["n"] == 6 and len(res["items"]) == 6
    # a random model: every item is either a format failure or a scored answer
    assert res["no_answer"] == sum(i["answer"] is None for i in res["items"])
    assert res["accuracy"] == pytest.approx(np.mean([i["correct"] for i in res["items"]]))
    assert res["tokens_per_s"] > 0 and res["params"] > 0


def test_ratio_interval_against_a_plain_loop():
    rng = np.random.default_rng(2)
    teacher = (rng.random(300) < 0.9).astype(float)
    student = teacher * (rng.random(300) < 0.7)
    ratio, lo, hi = bootstrap_ratio(student, teacher, resamples=3000, seed=4)
    assert ratio == pytest.approx(student.mean() / teacher.mean())
    # the same resamples written the plain way
    idx = np.random.default_rng(4).integers(0, 300, size=(3000, 300))
    plain = [student[i].mean() / teacher[i].mean() for i in idx]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(plain, [0.025, 0.975])))
    assert lo < ratio < hi
    with pytest.raises(ValueError, match="undefined"):
        bootstrap_ratio(student, np.zeros(300))
