"""Bootstrap confidence intervals: no number in a report without its interval.

* :func:`bootstrap_ci`: the mean of any per-item score (0/1 correctness, F1, pass@1 fractions,
  judge scores) with its percentile-bootstrap interval;
* :func:`paired_bootstrap_diff` / :func:`bootstrap_ratio`: two models on the same items;
* :func:`aggregate_over_seeds`: several seeds (training or sampling) over the same items, with
  a two-level bootstrap that counts both seed-to-seed and item-to-item variation;
* :func:`min_detectable_difference` / :func:`items_needed`: how large a difference an eval set
  of n items can resolve, for the "eval set too small" warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

_CHUNK_CELLS = 4_000_000  # resampled values held at once (~32 MB of float64)


def bootstrap_ci(
    values: Sequence[float], resamples: int = 10000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap ``level`` interval: (mean, lo, hi).

    Any per-item floats work (not only 0/1). Resamples are drawn in chunks, so 10k resamples
    of a 100k-item eval set do not need 8 GB.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty list of numbers, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("bootstrap_ci got NaN or infinite values: score every item with a finite number")
    means = _resampled_means(x, resamples, np.random.default_rng(seed))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(x.mean()), float(lo), float(hi)


def _resampled_means(x: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples`` means of ``x [n]`` drawn with replacement, in chunks of bounded memory."""
    step = max(1, _CHUNK_CELLS // x.size)
    return np.concatenate([
        x[rng.integers(0, x.size, size=(min(step, resamples - start), x.size))].mean(axis=1)
        for start in range(0, resamples, step)
    ])


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


@dataclass(frozen=True)
class SeedAggregate:
    """The mean over seeds and items, its interval, and what went into it."""

    mean: float
    lo: float
    hi: float
    seed_means: list[float]
    n_items: int


def aggregate_over_seeds(
    per_seed_scores: Sequence[Sequence[float]], resamples: int = 10000, level: float = 0.95,
    seed: int = 0, same_items: bool = True,
) -> SeedAggregate:
    """Mean score over seeds (e.g. students trained with different seeds, or sampling seeds)
    with a two-level bootstrap interval: resample seeds, then items.

    ``per_seed_scores[s][i]`` is seed s's score on item i. With ``same_items`` (every seed
    scored on one eval set, the usual case) one draw of item indices is shared by the drawn
    seeds: items are a crossed factor, and a hard item is hard for every seed. Otherwise
    (each seed on its own items) items are redrawn within each drawn seed (nested).

    Why both levels: resampling items alone treats seeds as fixed and ignores seed-to-seed
    variation (too narrow when training is noisy); resampling seed means alone ignores that
    the eval set is a sample too. Resampling both counts both. With few seeds (2–4) the
    seed level has few distinct draws and the interval is too narrow; report the seed means
    (kept in ``seed_means``) next to it.
    """
    rows = [np.asarray(r, dtype=np.float64) for r in per_seed_scores]
    if not rows or any(r.ndim != 1 or r.size == 0 for r in rows):
        raise ValueError("aggregate_over_seeds needs at least one seed, each with a non-empty list of scores")
    if any(not np.isfinite(r).all() for r in rows):
        raise ValueError("aggregate_over_seeds got NaN or infinite scores")
    rng = np.random.default_rng(seed)
    if same_items:
        if len({r.size for r in rows}) != 1:
            raise ValueError(f"same_items=True needs every seed scored on the same items, got sizes "
                             f"{[r.size for r in rows]}; pass same_items=False if the items differ")
        means = _crossed_means(np.stack(rows), resamples, rng)
    else:
        means = _nested_means(rows, resamples, rng)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    seed_means = [float(r.mean()) for r in rows]
    return SeedAggregate(float(np.mean(seed_means)), float(lo), float(hi), seed_means,
                         int(sum(r.size for r in rows) // len(rows)))


def _crossed_means(x: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of ``x [seeds, items]``: seeds and items drawn with replacement.

    A draw's mean is ``w @ x @ c / (S * N)`` with ``w`` the seeds' and ``c`` the items'
    draw counts, which is the mean of ``x[seed_idx][:, item_idx]`` without building it.
    """
    n_seeds, n_items = x.shape
    step = max(1, _CHUNK_CELLS // n_items)
    out = []
    for start in range(0, resamples, step):
        b = min(step, resamples - start)
        seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=b)  # [b, S]
        item_counts = rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=b)  # [b, N]
        per_seed = item_counts @ x.T  # [b, S]: each seed's sum over the drawn items
        out.append((seed_counts * per_seed).sum(axis=1) / (n_seeds * n_items))
    return np.concatenate(out)


def _nested_means(rows: list[np.ndarray], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means when each seed has its own items: draw seeds, then items within each
    drawn seed (a seed drawn twice gets two independent item draws)."""
    drawn = rng.integers(0, len(rows), size=(resamples, len(rows)))  # [resamples, seeds]
    slot_means = np.empty(drawn.shape)
    for s, row in enumerate(rows):
        where = drawn == s
        if where.any():
            slot_means[where] = _resampled_means(row, int(where.sum()), rng)
    return slot_means.mean(axis=1)


def _z(level: float, power: float) -> float:
    if not (0 < level < 1 and 0 < power < 1):
        raise ValueError(f"level and power must be in (0, 1), got level={level}, power={power}")
    return NormalDist().inv_cdf(1 - (1 - level) / 2) + NormalDist().inv_cdf(power)


def _sd_of_difference(p: float, paired: bool, discordance: float | None, sd: float | None) -> float:
    """Standard deviation of one item's contribution to the difference of two means."""
    if sd is None:
        if not 0 <= p <= 1:
            raise ValueError(f"p is an accuracy in [0, 1], got {p}")
        sd = (p * (1 - p)) ** 0.5
    if not paired or discordance is None:
        # two independent means of variance sd^2 / n each (paired: the models' errors independent)
        return (2.0 * sd * sd) ** 0.5
    if not 0 <= discordance <= 1:
        raise ValueError(f"discordance is a fraction of items in [0, 1], got {discordance}")
    return discordance**0.5  # d_i in {-1, 0, 1}: Var(d) ≈ P(d != 0) near no difference


def min_detectable_difference(
    n: int, p: float = 0.5, *, paired: bool = False, discordance: float | None = None,
    sd: float | None = None, level: float = 0.95, power: float = 0.8,
) -> float:
    """Smallest true difference between two models' mean scores that ``n`` items resolve.

    ``MDD = (z_{1-(1-level)/2} + z_{power}) * sd_d / sqrt(n)``, the normal-approximation
    two-sided test at ``level`` with the given ``power``. ``sd_d`` is the per-item standard
    deviation of the difference:

    * unpaired (two models on separate sets of n items): ``sqrt(2 p (1-p))``;
    * paired (same items, :func:`paired_bootstrap_diff`): ``sqrt(discordance)``, the fraction
      of items where exactly one model is right (McNemar); without it, errors are taken as
      independent (``discordance = 2 p (1-p)``), which is the unpaired figure;
    * ``sd``: the per-item score's standard deviation for non-binary metrics (F1, judge
      scores), in place of ``sqrt(p (1-p))``.

    ``power=0.5`` gives the half-width of the difference's interval: a smaller observed
    difference has a ``level`` interval that includes 0.
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of items, got {n}")
    return _z(level, power) * _sd_of_difference(p, paired, discordance, sd) / n**0.5


def items_needed(
    difference: float, p: float = 0.5, *, paired: bool = False, discordance: float | None = None,
    sd: float | None = None, level: float = 0.95, power: float = 0.8,
) -> int:
    """Items needed to resolve ``difference`` (the inverse of :func:`min_detectable_difference`)."""
    if difference <= 0:
        raise ValueError(f"difference must be > 0, got {difference}")
    sd_d = _sd_of_difference(p, paired, discordance, sd)
    return max(1, int(np.ceil((_z(level, power) * sd_d / difference) ** 2)))
