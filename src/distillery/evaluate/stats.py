"""Bootstrap confidence intervals: no number in a report without its interval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float], resamples: int = 10000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap ``level`` interval: (mean, lo, hi)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(x.mean()), float(lo), float(hi)


def bootstrap_ratio(
    num: Sequence[float], den: Sequence[float], resamples: int = 10000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """mean(num) / mean(den) over the same items, with a paired bootstrap interval.

    The demo's "student keeps X% of the teacher's accuracy": items are resampled together so
    the interval reflects that both accuracies were measured on the same problems.
    """
    x, y = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired values need the same, non-empty items: {x.shape} vs {y.shape}")
    if y.mean() == 0:
        raise ValueError("the denominator's mean is 0: the ratio is undefined")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    den_means = y[idx].mean(axis=1)
    ratios = x[idx].mean(axis=1) / np.where(den_means == 0, np.nan, den_means)
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(ratios, [alpha, 1 - alpha])
    return float(x.mean() / y.mean()), float(lo), float(hi)


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], resamples: int = 10000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a − b`` over the same items and its bootstrap interval: (diff, lo, hi).

    Resampling items (not each model separately) keeps the pairing, so the interval is the
    one for the difference itself, narrower than comparing two separate intervals.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same items: {x.shape} vs {y.shape}")
    return bootstrap_ci(x - y, resamples, level, seed)
