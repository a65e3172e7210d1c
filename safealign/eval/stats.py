"""Confidence intervals for the evaluation table (issue 11 item 2).

Every rate carries a 95% Wilson score interval (it stays inside [0, 1] and is not degenerate at
0/n or n/n, unlike the normal "Wald" interval). Every mean carries a 95% percentile bootstrap
interval that resamples PROMPTS, not responses: the samples of one prompt are correlated, so
resampling responses would understate the spread when there are several samples per prompt.
Randomness is an argument (a seed), so the same inputs give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from statistics import NormalDist

import numpy as np

Interval = tuple[float, float]


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)  # 1.959963... for 95%


def wilson_interval(k: int, n: int, level: float = 0.95) -> Interval | None:
    """Wilson score interval of a binomial rate ``k / n`` (None when ``n == 0``).

    Wilson (1927), as in Newcombe (1998) method 3: with p = k/n and z the normal quantile,
    centre = (p + z²/2n) / (1 + z²/n), half-width = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²).
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return None
    z, p = _z(level), k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # the exact endpoints at k = 0 and k = n are 0 and 1; clip float round-off there
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean_interval(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[Hashable],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval | None:
    """Percentile bootstrap interval of the mean of ``values``, resampling whole groups (prompts).

    Each replicate draws as many groups as there are, with replacement, and takes the mean over
    all finite values of the drawn groups (the same pooled mean as the point estimate). NaN values
    (unscored / empty responses) are skipped; None when no value is finite.

    Args:
        values: per-response values. Shape: (N,).
        groups: the prompt of each value (any hashable). Shape: (N,).
        n_boot: number of bootstrap replicates B.
        seed: seeds ``np.random.default_rng``.
    """
    vals = np.asarray(values, dtype=float).reshape(-1)
    if len(groups) != vals.size:
        raise ValueError(f"{vals.size} values but {len(groups)} group labels")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    ok = np.isfinite(vals)
    if not ok.any():
        return None
    _, gid = np.unique(np.array([str(g) for g in groups], dtype=object)[ok], return_inverse=True)
    sums = np.bincount(gid, weights=vals[ok])  # (G,)
    counts = np.bincount(gid).astype(float)  # (G,) every kept group has >= 1 value
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, sums.size, size=(n_boot, sums.size))  # (B, G)
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)  # (B,)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)
