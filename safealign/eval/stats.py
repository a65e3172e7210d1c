"""Confidence intervals for the evaluation table (issue 11 item 2).

Every rate carries a 95% Wilson score interval (it stays inside [0, 1] and is not degenerate at
0/n or n/n, unlike the normal "Wald" interval). Every mean carries a 95% percentile bootstrap
interval that resamples PROMPTS, not responses: the samples of one prompt are correlated, so
resampling responses would understate the spread when there are several samples per prompt.
Randomness is an argument (a seed), so the same inputs give the same interval.

Several samples per prompt are correlated too, for rates: :func:`clustered_wilson_interval` keeps
Wilson's shape (bounded, sane at 0/n) but uses Kish's effective sample size n / deff, with the
design effect deff estimated from the spread of the per-prompt counts (docs/methods.md A.5).
Differences between two models evaluated on the same prompts use a PAIRED bootstrap
(:func:`paired_bootstrap_interval`): one draw of prompts serves both models, so the prompt effect
they share cancels in the difference.
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
    return _wilson(k / n, n, _z(level))


def _wilson(p: float, n: float, z: float) -> Interval:
    """Wilson's interval at rate ``p`` and (possibly effective, non-integer) sample size ``n``."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # the exact endpoints at k = 0 and k = n are 0 and 1: set them, not the round-off (~1e-19)
    lo = 0.0 if p == 0.0 else max(0.0, centre - half)
    return lo, 1.0 if p == 1.0 else min(1.0, centre + half)


def _group_totals(values, groups: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group sums and counts of the finite ``values``: (group labels, sums, counts), groups
    sorted by label; a group whose values are all NaN has count 0."""
    vals = np.asarray(values, dtype=float).reshape(-1)
    if len(groups) != vals.size:
        raise ValueError(f"{vals.size} values but {len(groups)} group labels")
    labels, gid = np.unique(np.array([str(g) for g in groups], dtype=object), return_inverse=True)
    ok = np.isfinite(vals)
    sums = np.bincount(gid[ok], weights=vals[ok], minlength=labels.size)  # (G,)
    counts = np.bincount(gid[ok], minlength=labels.size).astype(float)  # (G,)
    return labels, sums, counts


def _percentiles(replicates: np.ndarray, level: float) -> Interval:
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(replicates, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _check_boot(n_boot: int) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def clustered_wilson_interval(
    flags: Sequence[float] | np.ndarray, groups: Sequence[Hashable], level: float = 0.95
) -> Interval | None:
    """Wilson interval of the share of 1s among the finite 0/1 ``flags``, samples grouped by prompt.

    Samples of one prompt are correlated, so N samples carry less than N samples' information.
    Kish's effective sample size n_eff = N / deff replaces N in Wilson's formula, with the design
    effect of the ratio estimator p = Σk_g / Σm_g (k_g ones among m_g finite flags of group g):
    deff = Σ_g (k_g − p·m_g)² / (N·p(1−p)), clipped to [1, N/G] (never narrower than Wilson, never
    wider than one sample per prompt). One sample per prompt gives deff = 1: plain Wilson. At
    p = 0 or 1 the correlation cannot be estimated and deff = 1 (docs/methods.md A.5).

    Returns:
        (lo, hi), or None when no flag is finite.
    """
    _, k_g, m_g = _group_totals(flags, groups)
    k_g, m_g = k_g[m_g > 0], m_g[m_g > 0]  # (G,) groups with >= 1 finite flag
    n = float(m_g.sum())
    if n == 0:
        return None
    p = float(k_g.sum()) / n
    deff = 1.0
    if 0.0 < p < 1.0:
        deff = float(((k_g - p * m_g) ** 2).sum() / (n * p * (1 - p)))
        deff = min(max(deff, 1.0), n / m_g.size)
    return _wilson(p, n / deff, _z(level))


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
    _check_boot(n_boot)
    _, sums, counts = _group_totals(values, groups)
    keep = counts > 0  # groups with no finite value do not take part (as in the point estimate)
    if not keep.any():
        return None
    sums, counts = sums[keep], counts[keep]  # (G,)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, sums.size, size=(n_boot, sums.size))  # (B, G)
    return _percentiles(sums[draws].sum(axis=1) / counts[draws].sum(axis=1), level)


def paired_bootstrap_interval(
    values_a: Sequence[float] | np.ndarray,
    groups_a: Sequence[Hashable],
    values_b: Sequence[float] | np.ndarray,
    groups_b: Sequence[Hashable],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval | None:
    """Paired percentile bootstrap interval of mean(a) − mean(b) over the SAME groups (prompts).

    Each replicate draws the groups once, with replacement, and takes both models' pooled means
    over that one draw, so what the groups share (an easy or a provocative prompt) cancels in the
    difference. For 0/1 flags this is a difference of rates. NaN values are skipped.

    Args:
        values_a, values_b: per-sample values of model a and model b. Shape: (N_a,), (N_b,).
        groups_a, groups_b: the group of each value; both models must cover the same groups.

    Returns:
        (lo, hi) of mean(a) − mean(b), or None when either model has no finite value.

    Raises:
        ValueError: when the two models were not evaluated on the same groups.
    """
    _check_boot(n_boot)
    labels_a, sums_a, counts_a = _group_totals(values_a, groups_a)
    labels_b, sums_b, counts_b = _group_totals(values_b, groups_b)
    if labels_a.size != labels_b.size or (labels_a != labels_b).any():
        raise ValueError("paired bootstrap: the two models were not evaluated on the same groups")
    if not counts_a.any() or not counts_b.any():
        return None
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, labels_a.size, size=(n_boot, labels_a.size))  # (B, G)
    with np.errstate(invalid="ignore", divide="ignore"):  # a draw of all-NaN groups -> skipped
        diff = (sums_a[draws].sum(1) / counts_a[draws].sum(1)
                - sums_b[draws].sum(1) / counts_b[draws].sum(1))  # (B,)  # fmt: skip
    return _percentiles(diff, level)
