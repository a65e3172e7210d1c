"""95% intervals of the evaluation tables (safealign.eval.stats), with hand-derived values."""

from __future__ import annotations

import numpy as np
import pytest

from safealign.eval.stats import (
    bootstrap_mean_interval,
    clustered_wilson_interval,
    paired_bootstrap_interval,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (0, 10, 0.0, 0.2775),  # z = 1.96: 0/n -> [0, z²/(n+z²)]
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),  # Newcombe (1998) Table I, method 3
        (15, 148, 0.0624, 0.1605),  # idem
        (1, 29, 0.0061, 0.1718),  # idem
    ],
)
def test_wilson_known_values(k, n, lo, hi):
    assert wilson_interval(k, n) == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_edges():
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    lo, hi = wilson_interval(5, 10, level=0.99)
    assert lo < 0.2366 and hi > 0.7634  # wider at 99%


def test_bootstrap_contains_mean_and_is_seeded():
    rng = np.random.default_rng(1)
    values = rng.normal(3.0, 1.0, size=60)
    groups = [i // 3 for i in range(60)]  # 20 prompts x 3 samples
    ci = bootstrap_mean_interval(values, groups, n_boot=500, seed=7)
    assert ci[0] < values.mean() < ci[1]
    assert ci == bootstrap_mean_interval(values, groups, n_boot=500, seed=7)
    assert ci != bootstrap_mean_interval(values, groups, n_boot=500, seed=8)
    # nan (empty / unscored) is skipped; one prompt -> a degenerate interval at its mean
    assert bootstrap_mean_interval([2.0, np.nan, 4.0], ["p"] * 3, n_boot=10) == (3.0, 3.0)
    assert bootstrap_mean_interval([np.nan], ["p"], n_boot=10) is None


def test_clustered_wilson_is_wilson_at_one_sample_per_prompt():
    flags = [1, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert clustered_wilson_interval(flags, range(10)) == pytest.approx(wilson_interval(2, 10))
    assert clustered_wilson_interval([np.nan], ["p"]) is None
    # no event: the correlation cannot be estimated -> plain Wilson on all samples
    assert clustered_wilson_interval([0.0] * 8, [i // 2 for i in range(8)]) == pytest.approx(
        wilson_interval(0, 8)
    )


def test_clustered_wilson_counts_each_prompt_once_when_its_samples_agree():
    # 10 prompts x 4 samples, 3 prompts all toxic, 7 never: p = 12/40 = 0.3 and
    # deff = (3·(4 − 1.2)² + 7·1.2²) / (40·0.3·0.7) = 33.6 / 8.4 = 4 -> n_eff = 10 prompts.
    flags = [1.0] * 12 + [0.0] * 28
    groups = [i // 4 for i in range(40)]
    assert clustered_wilson_interval(flags, groups) == pytest.approx(wilson_interval(3, 10))
    assert wilson_interval(12, 40)[1] < wilson_interval(3, 10)[1]  # plain Wilson: too narrow
    # every prompt 2 of 4: no between-prompt spread, deff = 0 clipped to 1 -> plain Wilson
    even = [1.0, 1.0, 0.0, 0.0] * 10
    assert clustered_wilson_interval(even, groups) == pytest.approx(wilson_interval(20, 40))


def test_paired_bootstrap_excludes_zero_when_pairs_differ_consistently():
    # 80 prompts; b toxic on prompts 0-39, a on 0-31: a − b = −0.1, and on every prompt a <= b.
    groups = list(range(80))
    b = np.array([1.0] * 40 + [0.0] * 40)
    a = np.array([1.0] * 32 + [0.0] * 48)
    lo, hi = paired_bootstrap_interval(a, groups, b, groups, n_boot=2000, seed=0)
    assert lo < -0.1 < hi < 0  # a draw missing all 8 differing prompts has p = 0.9^80 ≈ 2e-4
    # unpaired, the two 95% intervals overlap: pairing is what resolves the difference
    assert wilson_interval(40, 80)[0] < wilson_interval(32, 80)[1]


def test_paired_bootstrap_keeps_zero_when_models_do_not_differ():
    groups = list(range(40))
    a = np.array([1.0] * 10 + [0.0] * 30)  # toxic on prompts 0-9
    b = np.roll(a, 5)  # toxic on prompts 5-14: same rate, different prompts
    lo, hi = paired_bootstrap_interval(a, groups, b, groups, n_boot=1000, seed=0)
    assert lo < 0 < hi
    again = paired_bootstrap_interval(a, groups, b, groups, n_boot=1000, seed=0)
    assert (lo, hi) == again  # seeded
    # several samples per group, NaN (empty) skipped, groups given in any order
    a2, g2 = np.array([1.0, np.nan, 0.0, 0.0]), ["p", "p", "q", "q"]
    b2, gb = np.array([0.0, 1.0, 1.0]), ["q", "p", "q"]
    ci = paired_bootstrap_interval(a2, g2, b2, gb, n_boot=200, seed=1)
    assert ci is not None and ci[0] <= 1 / 3 - 2 / 3 <= ci[1]
    with pytest.raises(ValueError, match="same groups"):
        paired_bootstrap_interval([1.0], ["p"], [1.0], ["q"], n_boot=10)
    assert paired_bootstrap_interval([np.nan], ["p"], [1.0], ["p"], n_boot=10) is None
