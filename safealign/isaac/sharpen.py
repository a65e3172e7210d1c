"""Cluster clipping, the sensitive indicator and the sharpened cluster distribution (docs/methods.md B.2
steps 5-8, B.5; ISAAC paper Alg. 1 l.15-25, Eq. 1-2).

Inputs are *raw* cluster sizes N_i (counts); clipping and SI always use them (SI is a ratio of
differences, so it is the same on either scale). What the softmax of Eq. 2 sees is ``scale``
(B.5 "d_c normalised or counts"):

* "shares" (default): d_c as a distribution, N_i / sum of the kept N_j. Alg. 1 l.14 builds d_c
  with getClustersDistribution and l.17 clips it by probability mass, so d_c is a distribution
  there; on this scale tau means the same thing whatever K (only proportions count), and
  tau ~ 0.01-1 spans winner-take-all to near-proportional draws (docs/methods.md B.2 step 8).
* "counts": N_i itself, as the figure and the authors' code do. With N_i up to K=150, the
  softmax is winner-take-all unless tau is of the order of the count gaps (tens).

Each function has one batched implementation over a (rows, C) matrix of sizes sorted descending
(ties in first-encounter order); the single-row functions call it with one row, so the sampler
and the unit tests exercise the same code.

Sharpening modes (``mode``):

| mode     | distribution over kept clusters                   | source                        |
|----------|---------------------------------------------------|-------------------------------|
| "paper"  | softmax(d_i / (max(SI, eps) * tau))               | Eq. 2 + B.5's eps floor       |
| "code"   | softmax(d_i / ((1 + eps - SI) * tau))             | authors' "dynamic_sharpen"    |
| "exp"    | softmax(d_i / tau)                                | authors' "exp"                |
| "wta"    | one-hot on the largest cluster                    | authors' "max"                |
| "random" | N_i / sum_j N_j (uniform over member responses)   | Theorem 1's baseline          |

d_i = N_i on the "counts" scale, N_i / sum_j N_j on "shares". "paper" and "code" react to SI in
opposite directions (B.2 step 8): a distinct head cluster (SI -> 1) gives "paper" temperature
tau and "code" temperature eps*tau.
"""

from __future__ import annotations

import numpy as np

from safealign.errors import ConfigError

MODES = ("paper", "code", "exp", "wta", "random")
SCALES = ("shares", "counts")  # softmax input of Eq. 2: Alg. 1's distribution, or the figure's N_i
# Default tau, on the "shares" scale, from the tau curves (docs/methods.md B.2 "Choosing eps and
# tau"): within 0.009 of the winner-take-all unsafe rate (tau 0.01) on the built-in corpus and
# DiaSafety-S/M/H, with 1.5-1.8 distinct clusters among M=3 targets instead of ~1.2.
TAU = 0.05
EPS = 1e-3  # Eq. 1's epsilon (the paper and the code both use 1e-3)


def check_params(
    *,
    tau: float = 1.0,
    eps: float = EPS,
    top_k: int = 1,
    top_p: float | None = None,
    mode: str = "paper",
    m: int = 1,
    scale: str = "shares",
) -> None:
    """Raise ConfigError naming the first invalid sampling parameter."""
    if not tau > 0:
        raise ConfigError("tau", f"the sharpening temperature must be > 0, got {tau}")
    if not eps > 0:
        raise ConfigError("eps", f"the SI epsilon must be > 0, got {eps}")
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise ConfigError("top_k", f"must be an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError("top_p", f"must be in (0, 1] or null, got {top_p}")
    if mode not in MODES:
        raise ConfigError("mode", f"must be one of {MODES}, got {mode!r}")
    if scale not in SCALES:
        raise ConfigError("scale", f"must be one of {SCALES}, got {scale!r}")
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 1:
        raise ConfigError("m", f"the number of targets per context must be >= 1, got {m!r}")


def sort_sizes(sizes: np.ndarray) -> np.ndarray:
    """Order of clusters by size descending, ties by position (``Counter.most_common``, B.2 step 5)."""
    return np.argsort(-np.asarray(sizes), kind="stable")


def n_kept_batch(sorted_sizes: np.ndarray, top_k: int, top_p: float | None) -> np.ndarray:
    """How many of each row's size-sorted clusters survive top-k then top-p (B.5).

    Top-k keeps the k largest (Alg. 1 l.16). Top-p then keeps the smallest prefix whose share of
    the top-k mass is >= p (Alg. 1 l.17; B.5: after top-k, before SI). Rows are zero-padded.
    """
    s = np.asarray(sorted_sizes, dtype=np.float64)[:, :top_k]
    kept = np.minimum((s > 0).sum(axis=1), top_k)
    if top_p is not None:
        cum = np.cumsum(s, axis=1)
        total = cum[:, -1:]
        # number of clusters whose cumulative share is still < p, plus the one that crosses p
        crossed = 1 + (cum < top_p * total * (1 - 1e-12)).sum(axis=1)
        kept = np.minimum(kept, crossed)
    return kept


def si_batch(sorted_sizes: np.ndarray, n_kept: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Sensitive indicator per row, Eq. 1: SI = (N_1 - N_2) / max(N_1 - N_{-1}, eps).

    Computed on the raw sizes of the kept clusters only (B.2 step 7); N_2 := 0 when only one
    cluster is kept (B.5 guard), N_{-1} is the last kept cluster.
    """
    s = np.asarray(sorted_sizes, dtype=np.float64)
    rows = np.arange(len(s))
    n1 = s[:, 0]
    n2 = np.where(n_kept >= 2, s[:, min(1, s.shape[1] - 1)], 0.0)
    n_last = s[rows, np.maximum(n_kept, 1) - 1]
    return (n1 - n2) / np.maximum(n1 - n_last, eps)


def probs_batch(
    sorted_sizes: np.ndarray,
    n_kept: np.ndarray,
    tau: float,
    mode: str,
    eps: float = EPS,
    scale: str = "shares",
) -> np.ndarray:
    """Sampling distribution over each row's size-sorted clusters; zero beyond ``n_kept`` (B.2 step 8).

    ``scale="shares"`` feeds d_i = N_i / sum_kept N_j to the softmax (Alg. 1 l.14-23),
    ``"counts"`` feeds N_i (the figure's Eq. 2). "wta" and "random" do not depend on the scale.
    """
    check_params(tau=tau, eps=eps, mode=mode, scale=scale)
    s = np.asarray(sorted_sizes, dtype=np.float64)
    cols = s.shape[1]
    kept = np.arange(cols)[None, :] < np.asarray(n_kept)[:, None]
    if mode == "wta":  # winner-take-all on the largest cluster (authors' "max")
        return np.where(np.arange(cols)[None, :] == 0, 1.0, 0.0) * np.ones((len(s), 1))
    if mode == "random":  # Theorem 1: proportional to N_i
        w = np.where(kept, s, 0.0)
        return w / w.sum(axis=1, keepdims=True)
    si = si_batch(s, n_kept, eps)
    if mode == "paper":  # Eq. 2, temperature SI*tau with B.5's eps floor on SI
        temp = np.maximum(si, eps) * tau
    elif mode == "code":  # authors' dynamic_sharpen: temperature (1 + eps - SI)*tau
        temp = (1.0 + eps - si) * tau
    else:  # "exp": plain softmax(N_i / tau)
        temp = np.full(len(s), float(tau))
    temp = np.where(np.asarray(n_kept) > 1, temp, 1.0)  # one kept cluster: p = [1] (guard SI)
    d = s if scale == "counts" else s / np.where(kept, s, 0.0).sum(axis=1, keepdims=True)
    logits = np.where(kept, d / temp[:, None], -np.inf)
    logits -= logits.max(axis=1, keepdims=True)  # numerically stable softmax
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


def clip_clusters(sizes: np.ndarray, top_k: int = 10, top_p: float | None = None) -> np.ndarray:
    """Indices (into ``sizes``) of the kept clusters, largest first, ties by position (B.2 step 5, B.5).

    Example: sizes [2, 5, 2, 1], top_k=2 -> [1, 0] (the tie 2/2 keeps the first-met cluster 0).
    """
    check_params(top_k=top_k, top_p=top_p)
    order = sort_sizes(sizes)
    n = n_kept_batch(np.asarray(sizes)[order][None, :], top_k, top_p)[0]
    return order[:n]


def sensitive_indicator(sizes: np.ndarray, eps: float = EPS) -> float:
    """Eq. 1 on the given (already clipped) raw cluster sizes, in any order."""
    check_params(eps=eps)
    s = np.sort(np.asarray(sizes, dtype=np.float64))[::-1][None, :]
    return float(si_batch(s, np.array([s.shape[1]]), eps)[0])


def cluster_probs(
    sizes: np.ndarray,
    tau: float = 1.0,
    mode: str = "paper",
    eps: float = EPS,
    scale: str = "shares",
) -> np.ndarray:
    """Sampling probabilities of the given (already clipped) clusters, aligned with ``sizes``.

    Ties for "wta" go to the first largest cluster, as ``Counter.most_common(1)`` does.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or len(sizes) == 0 or (sizes <= 0).any():
        raise ValueError(f"sizes must be a non-empty 1-D array of positive counts, got {sizes}")
    order = sort_sizes(sizes)
    n = np.array([len(sizes)])
    p_sorted = probs_batch(sizes[order][None, :], n, tau, mode, eps, scale)[0]
    out = np.empty_like(p_sorted)
    out[order] = p_sorted
    return out
