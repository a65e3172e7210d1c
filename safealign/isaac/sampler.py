"""ISAAC pseudo-response sampler (docs/methods.md B.2 steps 3-10 with B.5's decisions; paper Alg. 1).

Two stages, so sweeps over tau / mode / M / top-k / top-p redo only the cheap part:

* :func:`prepare_neighbourhoods` (defined in :mod:`safealign.isaac.prepare`) - context top-K
  (step 3) and DBSCAN of the neighbours' responses (step 4). Expensive; cached as .npz keyed by
  the embeddings' content, K, eps and the search method.
* :func:`draw_targets` - clipping, SI, sharpening, keep-original and M draws (steps 5-9),
  vectorised over all contexts.

Behaviour on awkward data (documented decisions):
* duplicate responses are fine: they sit at distance 0 and land in the same cluster; the
  keep-original shortcut matches the original by *string* (as the authors' ``r_i in cluster``);
* empty or whitespace-only responses raise DataError naming the row: a pseudo target must be a
  response, and the loaders drop empty rows (DiaSafety has 3);
* a corpus with fewer rows than K: K is clamped to N with a warning (:func:`prepare_neighbourhoods`);
  the low-level :func:`~safealign.isaac.neighbours.topk_cosine` raises instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from safealign.errors import DataError
from safealign.isaac.prepare import Neighbourhoods, prepare_neighbourhoods
from safealign.isaac.sharpen import EPS, TAU, check_params, n_kept_batch, probs_batch, si_batch
from safealign.types import MultiTargetExample

log = logging.getLogger(__name__)

__all__ = [
    "Neighbourhoods",
    "SamplerResult",
    "as_multi_target",
    "check_texts",
    "draw_targets",
    "original_mask",
    "prepare_neighbourhoods",
    "sample_pseudo_responses",
]


@dataclass
class SamplerResult:
    """Targets and per-context diagnostics. All arrays have N rows (one per context)."""

    targets: np.ndarray  # (N, M) int64 indices into ``responses``
    n_clusters: np.ndarray  # (N,) clusters among the K neighbours, before clipping
    n_kept: np.ndarray  # (N,) clusters kept after top-k (and top-p)
    si: np.ndarray  # (N,) sensitive indicator, Eq. 1 (inf-like N_1/eps when one cluster is kept)
    kept_original: np.ndarray  # (N,) bool: keep-original shortcut fired (B.2 step 6)
    head_share: np.ndarray  # (N,) largest cluster's share of the K neighbours
    params: dict = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Scalar diagnostics for logging."""
        si = self.si[self.n_kept > 1]
        return {
            "contexts": int(len(self.targets)),
            "targets_per_context": int(self.targets.shape[1]),
            "mean_clusters": float(self.n_clusters.mean()),
            "mean_kept_clusters": float(self.n_kept.mean()),
            "single_cluster_rate": float((self.n_clusters == 1).mean()),
            "keep_original_rate": float(self.kept_original.mean()),
            "mean_si": float(si.mean()) if len(si) else float("nan"),
            "mean_head_share": float(self.head_share.mean()),
            "target_is_original_rate": float(
                (self.targets == np.arange(len(self.targets))[:, None]).mean()
            ),
        }


def check_texts(texts: Sequence[str], what: str) -> None:
    """Raise DataError naming the first empty/whitespace-only (or non-string) row."""
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise DataError(
                what,
                f"row {i} is empty or not a string ({t!r}); drop it before "
                "sampling (a pseudo target must be a non-empty response)",
            )


def original_mask(nb: Neighbourhoods, responses: Sequence[str]) -> np.ndarray:
    """(N, K) bool: neighbour j's response text equals context i's own response (string match,
    as the authors' ``r_i in cluster``; exact duplicates count as the original)."""
    ids: dict[str, int] = {}
    rid = np.fromiter((ids.setdefault(r, len(ids)) for r in responses), np.int64, len(responses))
    return rid[nb.neigh_idx] == rid[:, None]


def _cluster_table(labels: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: sizes of all clusters by label (N, C), and the labels + sizes of the top_k
    largest (size desc, ties by label = first-encounter order, as Counter.most_common)."""
    n, k = labels.shape
    c = int(labels.max()) + 1  # labels are 0..C_i-1 per row; C = the most clusters of any row
    counts = np.bincount((labels + np.arange(n)[:, None] * c).ravel(), minlength=n * c)
    counts = counts.reshape(n, c).astype(np.int32)
    # a stable ascending argsort of (K - count) keeps equal sizes in label (first-encounter) order
    order = np.argsort((k - counts).astype(_small(k + 1)), axis=1, kind="stable")[:, :top_k]
    if order.shape[1] < top_k:  # fewer clusters than top_k everywhere: pad with empty ones
        pad = np.zeros((n, top_k - order.shape[1]), dtype=order.dtype)
        order = np.concatenate([order, pad], axis=1)
        sizes = np.take_along_axis(counts, order, axis=1)
        sizes[:, c:] = 0
        return counts, order, sizes
    return counts, order, np.take_along_axis(counts, order, axis=1)


def _small(bound: int) -> type:
    """Narrowest integer dtype for values < bound: numpy's stable argsort radix-sorts <= 16 bits."""
    return np.uint8 if bound <= 256 else np.int16 if bound < 2**15 else np.int64


def _members(
    labels: np.ndarray, counts: np.ndarray, cluster: np.ndarray, j: np.ndarray
) -> np.ndarray:
    """Neighbour position of the j-th member (neighbour order) of ``cluster`` per (row, draw)."""
    perm = np.argsort(labels.astype(_small(counts.shape[1])), axis=1, kind="stable")
    starts = np.cumsum(counts, axis=1) - counts  # where each label's members start in perm
    rows = np.arange(len(labels))[:, None]
    return perm[rows, starts[rows, cluster] + j]


def _draw(
    labels: np.ndarray, neigh: np.ndarray, counts: np.ndarray, top_labels: np.ndarray,
    probs: np.ndarray, n_kept: np.ndarray, m: int, rng: np.random.Generator,
) -> np.ndarray:  # fmt: skip
    """(N, M) neighbour rows: a cluster rank by inverse CDF, then a uniform member of it
    (torch.multinomial + random.randint in the authors' code; B.2 step 9). Every row draws,
    so rows that the keep-original shortcut overrides do not change the others' draws."""
    n = len(labels)
    u, v = rng.random((n, m)), rng.random((n, m))
    cdf = np.cumsum(probs, axis=1)
    rank = np.minimum((u[:, :, None] >= cdf[:, None, :]).sum(axis=2), n_kept[:, None] - 1)
    cluster = np.take_along_axis(top_labels, rank, axis=1)  # (N, M) label ids
    size = np.take_along_axis(counts, cluster, axis=1)
    j = np.minimum((v * size).astype(np.int64), size - 1)
    return np.take_along_axis(neigh, _members(labels, counts, cluster, j), axis=1)


def draw_targets(
    nb: Neighbourhoods,
    is_original: np.ndarray | None = None,
    *,
    top_k: int = 10, top_p: float | None = None,
    tau: float = TAU, mode: str = "paper", scale: str = "shares", eps: float = EPS,
    m: int = 3, keep_original: bool = True,
    rng: np.random.Generator,
) -> SamplerResult:  # fmt: skip
    """Draw M pseudo targets per context from prepared neighbourhoods (B.2 steps 5-9).

    Args:
        nb: Output of :func:`prepare_neighbourhoods`.
        is_original: (N, K) bool, neighbour j carries context i's own response (see
            :func:`original_mask`); default: neighbour j is row i itself.
        top_k, top_p: Cluster clipping (B.2 step 5; B.5 top-p after top-k, before SI).
        tau, mode, eps, scale: Sharpening (Eq. 1-2; :mod:`safealign.isaac.sharpen`); tau is on
            the scale's units: "shares" (Alg. 1's d_c) or "counts" (the figure's N_i).
        m: Targets per context, drawn independently with replacement (B.2 step 9).
        keep_original: M copies of the original when it is in the largest kept cluster (step 6).
        rng: Source of all randomness.

    Returns: SamplerResult with ``targets`` Shape: (N, M), indices into the responses.
    """
    params = dict(top_k=top_k, top_p=top_p, tau=tau, mode=mode, m=m, eps=eps, scale=scale)
    check_params(**params)
    labels, neigh = nb.labels, nb.neigh_idx
    n, k = labels.shape
    counts, top_labels, top_sizes = _cluster_table(labels, top_k)
    n_kept = n_kept_batch(top_sizes, top_k, top_p)
    probs = probs_batch(top_sizes, n_kept, tau, mode, eps, scale)  # (N, top_k)
    targets = _draw(labels, neigh, counts, top_labels, probs, n_kept, m, rng)
    if is_original is None:
        is_original = neigh == np.arange(n)[:, None]
    # B.2 step 6 fires when the original is in the largest kept cluster (ties: first met)
    fired = (is_original & (labels == top_labels[:, :1])).any(axis=1) & keep_original
    targets[fired] = np.arange(n)[fired, None]  # M copies of the original
    return SamplerResult(
        targets=targets.astype(np.int64),
        n_clusters=(labels.max(axis=1) + 1).astype(np.int32),
        n_kept=n_kept.astype(np.int32),
        si=si_batch(top_sizes, n_kept, eps),
        kept_original=fired,
        head_share=top_sizes[:, 0] / k,
        params=dict(k=nb.k, eps_dbscan=nb.eps, **params, keep_original=keep_original),
    )


def sample_pseudo_responses(
    contexts: Sequence[str],
    responses: Sequence[str],
    ctx_emb: np.ndarray,
    resp_emb: np.ndarray,
    *,
    rng: np.random.Generator,
    k: int = 150,
    eps: float = 0.22,
    neighbours: str = "exact",
    cache_dir: str | None = None,
    **draw: Any,
) -> SamplerResult:
    """Alg. 1 end to end: neighbours + DBSCAN (cached) then M draws per context.

    Args:
        contexts, responses: The corpus pairs (u_i, r_i); responses must be non-empty.
        ctx_emb, resp_emb: Their embeddings, Shape: (N, d) each.
        k, eps, neighbours: Context top-K, DBSCAN radius, "exact" | "ivf" | "hnsw".
        rng: Source of all randomness.
        cache_dir: Where to cache the neighbourhoods (.npz); None = no cache.
        **draw: top_k, top_p, tau, mode, m, scale, keep_original of :func:`draw_targets` (the SI
            epsilon keeps its default: ``eps`` here is DBSCAN's radius).

    Returns:
        SamplerResult; ``targets[i]`` are indices into ``responses``.
    """
    if len(contexts) != len(responses):
        raise DataError("corpus", f"{len(contexts)} contexts but {len(responses)} responses")
    check_texts(responses, "responses")
    keep_original = draw.pop("keep_original", True)
    check_params(**draw)  # before the expensive half
    nb = prepare_neighbourhoods(
        ctx_emb, resp_emb, k=k, eps=eps, neighbours=neighbours, cache_dir=cache_dir
    )
    return draw_targets(
        nb, original_mask(nb, responses), keep_original=keep_original, rng=rng, **draw
    )


def as_multi_target(
    contexts: Sequence[str], responses: Sequence[str], result: SamplerResult
) -> list[MultiTargetExample]:
    """Turn sampled indices into MultiTargetExample records (B.2 step 10)."""
    return [
        MultiTargetExample(context=c, targets=tuple(responses[t] for t in row), original=r)
        for c, r, row in zip(contexts, responses, result.targets.tolist(), strict=True)
    ]
