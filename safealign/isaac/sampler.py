"""ISAAC pseudo-response sampler (METHODS.md B.2 steps 3-10 with B.5's decisions; paper Alg. 1).

Two stages, so sweeps over tau / mode / M / top-k / top-p redo only the cheap part:

* :func:`prepare_neighbourhoods` - context top-K (step 3) and DBSCAN of the neighbours' responses
  (step 4). Expensive; cached as .npz keyed by the embeddings' content, K, eps and the search method.
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

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from safealign.errors import DataError
from safealign.io import atomic_path, stable_hash
from safealign.isaac import sharpen
from safealign.isaac.cluster import dbscan_neighbourhoods
from safealign.isaac.neighbours import topk_cosine, topk_faiss
from safealign.types import MultiTargetExample

log = logging.getLogger(__name__)

__all__ = ["Neighbourhoods", "SamplerResult", "as_multi_target", "check_texts", "draw_targets",
           "original_mask", "prepare_neighbourhoods", "sample_pseudo_responses"]


@dataclass
class Neighbourhoods:
    """The expensive, tau-independent part of Alg. 1 (l.9-13), computed once per (embeddings, K, eps)."""

    neigh_idx: np.ndarray  # (N, K) int64 context neighbours, closest first, self included
    sims: np.ndarray  # (N, K) float32 cosine similarities
    labels: np.ndarray  # (N, K) int32 DBSCAN labels of the neighbours' responses
    k: int
    eps: float
    method: str
    key: str = ""


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a, dtype=np.float32)
    h = hashlib.sha256(f"{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


def _load_cached(path: Path, key: str, n: int, k: int) -> Neighbourhoods | None:
    """The cached neighbourhoods, or None if missing, corrupt or not for these inputs."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in ("neigh_idx", "sims", "labels", "key", "meta")}
        ok = (str(arrays["key"]) == key and arrays["neigh_idx"].shape == (n, k)
              and arrays["labels"].shape == (n, k) and arrays["sims"].shape == (n, k)
              and 0 <= arrays["neigh_idx"].min() and arrays["neigh_idx"].max() < n
              and 0 <= arrays["labels"].min() and arrays["labels"].max() < k)
        if not ok:
            raise ValueError("content does not match the inputs")
    except Exception as e:  # noqa: BLE001 - any unreadable cache is recomputed, never used
        log.warning("ignoring neighbourhood cache %s (%s); recomputing", path, e)
        return None
    eps, method = str(arrays["meta"][0]), str(arrays["meta"][1])
    return Neighbourhoods(arrays["neigh_idx"].astype(np.int64), arrays["sims"],
                          arrays["labels"].astype(np.int32), k, float(eps), method, key)


def _save(path: Path, nb: Neighbourhoods) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, neigh_idx=nb.neigh_idx, sims=nb.sims, labels=nb.labels, key=np.array(nb.key),
                 meta=np.array([repr(nb.eps), nb.method]))


def prepare_neighbourhoods(
    ctx_emb: np.ndarray,
    resp_emb: np.ndarray,
    *,
    k: int = 150,
    eps: float = 0.22,
    neighbours: str = "exact",
    normalise_responses: bool = False,
    batch_size: int = 256,
    faiss_params: dict | None = None,
    cache_dir: str | Path | None = None,
) -> Neighbourhoods:
    """Context top-K (B.2 step 3) and DBSCAN of the neighbours' responses (step 4), cached.

    Args:
        ctx_emb, resp_emb: Embeddings of contexts and responses, Shape: (N, d) each.
        k: Neighbours per context, self included; clamped to N (with a warning) if larger.
        eps: DBSCAN radius on (un-normalised, unless ``normalise_responses``) response vectors.
        neighbours: "exact" (blocked cosine) or "ivf" / "hnsw" (FAISS, approximate).
        batch_size: Contexts per DBSCAN batch.
        faiss_params: Extra keyword arguments for :func:`topk_faiss`.
        cache_dir: Directory for the .npz cache (keyed by the embeddings' content, K, eps, method).

    Returns:
        Neighbourhoods.
    """
    if len(ctx_emb) != len(resp_emb):
        raise DataError("embeddings", f"{len(ctx_emb)} context rows but {len(resp_emb)} response rows")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    n = len(ctx_emb)
    if k > n:
        log.warning("k=%d neighbours but only %d rows: using k=%d", k, n, n)
        k = n
    faiss_params = dict(faiss_params or {})
    key = stable_hash("isaac-neighbourhoods-v1", _digest(ctx_emb), _digest(resp_emb), k, eps,
                      neighbours, normalise_responses, faiss_params)
    path = Path(cache_dir) / f"neighbourhoods-{key}.npz" if cache_dir else None
    if path is not None and (nb := _load_cached(path, key, n, k)) is not None:
        return nb
    if neighbours == "exact":
        idx, sims = topk_cosine(ctx_emb, k)
    elif neighbours in ("ivf", "hnsw"):
        idx, sims = topk_faiss(ctx_emb, k, method=neighbours, **faiss_params)
    else:
        raise ValueError(f"neighbours must be 'exact', 'ivf' or 'hnsw', got {neighbours!r}")
    labels = dbscan_neighbourhoods(resp_emb, idx, eps, batch_size=batch_size,
                                   normalise=normalise_responses)
    nb = Neighbourhoods(idx, sims, labels, k, float(eps), neighbours, key)
    if path is not None:
        _save(path, nb)
    return nb


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
                (self.targets == np.arange(len(self.targets))[:, None]).mean()),
        }


def check_texts(texts: Sequence[str], what: str) -> None:
    """Raise DataError naming the first empty/whitespace-only (or non-string) row."""
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise DataError(what, f"row {i} is empty or not a string ({t!r}); drop it before "
                                  "sampling (a pseudo target must be a non-empty response)")


def original_mask(nb: Neighbourhoods, responses: Sequence[str]) -> np.ndarray:
    """(N, K) bool: neighbour j's response text equals context i's own response (string match,
    as the authors' ``r_i in cluster``; exact duplicates count as the original)."""
    ids: dict[str, int] = {}
    rid = np.fromiter((ids.setdefault(r, len(ids)) for r in responses), np.int64, len(responses))
    return rid[nb.neigh_idx] == rid[:, None]


def _cluster_table(labels: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: sizes of all clusters by label, and the labels + sizes of the top_k largest
    (size desc, ties by label = first-encounter order, as Counter.most_common)."""
    n, k = labels.shape
    counts = np.bincount((labels + np.arange(n)[:, None] * k).ravel(), minlength=n * k)
    counts = counts.reshape(n, k)
    # argsort of -count is stable, so equal sizes stay in label (first-encounter) order
    order = np.argsort(-counts, axis=1, kind="stable")[:, :top_k]
    return counts, order, np.take_along_axis(counts, order, axis=1)


def _members(labels: np.ndarray, counts: np.ndarray, cluster: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Neighbour position of the j-th member (neighbour order) of ``cluster`` per (row, draw)."""
    n, k = labels.shape
    perm = np.argsort(labels, axis=1, kind="stable")  # members grouped by label, in list order
    starts = np.cumsum(counts, axis=1) - counts
    rows = np.arange(n)[:, None]
    return perm[rows, starts[rows, cluster] + j]


def draw_targets(
    nb: Neighbourhoods,
    is_original: np.ndarray | None = None,
    *,
    top_k: int = 10,
    top_p: float | None = None,
    tau: float = 1.0,
    mode: str = "paper",
    m: int = 3,
    keep_original: bool = True,
    eps: float = sharpen.EPS,
    rng: np.random.Generator,
) -> SamplerResult:
    """Draw M pseudo targets per context from prepared neighbourhoods (B.2 steps 5-9).

    Args:
        nb: Output of :func:`prepare_neighbourhoods`.
        is_original: (N, K) bool, neighbour j carries context i's own response (see
            :func:`original_mask`); default: neighbour j is row i itself.
        top_k, top_p: Cluster clipping (B.2 step 5; B.5 top-p after top-k, before SI).
        tau, mode, eps: Sharpening (Eq. 1-2; modes in :mod:`safealign.isaac.sharpen`).
        m: Targets per context, drawn independently with replacement (B.2 step 9).
        keep_original: M copies of the original when it is in the largest kept cluster (step 6).
        rng: Source of all randomness.

    Returns:
        SamplerResult with ``targets`` Shape: (N, M), indices into the responses.
    """
    sharpen.check_params(tau=tau, eps=eps, top_k=top_k, top_p=top_p, mode=mode, m=m)
    labels, neigh = nb.labels, nb.neigh_idx
    n, k = labels.shape
    counts, top_labels, top_sizes = _cluster_table(labels, top_k)
    n_kept = sharpen.n_kept_batch(top_sizes, top_k, top_p)
    probs = sharpen.probs_batch(top_sizes, n_kept, tau, mode, eps)  # (N, top_k)
    # Inverse-CDF draws: the cluster rank, then a uniform member of it (torch.multinomial +
    # random.randint in the authors' code). Drawn for every row, so rows the shortcut overrides
    # do not change the others' draws.
    u, v = rng.random((n, m)), rng.random((n, m))
    cdf = np.cumsum(probs, axis=1)
    rank = np.minimum((u[:, :, None] >= cdf[:, None, :]).sum(axis=2), n_kept[:, None] - 1)
    cluster = np.take_along_axis(top_labels, rank, axis=1)  # (N, M) label ids
    size = np.take_along_axis(counts, cluster, axis=1)
    j = np.minimum((v * size).astype(np.int64), size - 1)
    targets = np.take_along_axis(neigh, _members(labels, counts, cluster, j), axis=1)
    if is_original is None:
        is_original = neigh == np.arange(n)[:, None]
    head = top_labels[:, :1]  # the largest kept cluster (ties: first met)
    fired = (is_original & (labels == head)).any(axis=1) & keep_original
    targets[fired] = np.arange(n)[fired, None]  # B.2 step 6: M copies of the original
    return SamplerResult(
        targets=targets.astype(np.int64),
        n_clusters=(labels.max(axis=1) + 1).astype(np.int32),
        n_kept=n_kept.astype(np.int32),
        si=sharpen.si_batch(top_sizes, n_kept, eps),
        kept_original=fired,
        head_share=top_sizes[:, 0] / k,
        params=dict(k=nb.k, eps_dbscan=nb.eps, top_k=top_k, top_p=top_p, tau=tau, mode=mode,
                    m=m, keep_original=keep_original, eps=eps),
    )


def sample_pseudo_responses(
    contexts: Sequence[str],
    responses: Sequence[str],
    ctx_emb: np.ndarray,
    resp_emb: np.ndarray,
    *,
    k: int = 150,
    eps: float = 0.22,
    top_k: int = 10,
    top_p: float | None = None,
    tau: float = 1.0,
    mode: str = "paper",
    m: int = 3,
    keep_original: bool = True,
    neighbours: str = "exact",
    rng: np.random.Generator,
    cache_dir: str | None = None,
) -> SamplerResult:
    """Alg. 1 end to end: neighbours + DBSCAN (cached) then M draws per context.

    Args:
        contexts, responses: The corpus pairs (u_i, r_i); responses must be non-empty.
        ctx_emb, resp_emb: Their embeddings, Shape: (N, d) each.
        k, eps, neighbours: Context top-K, DBSCAN radius, "exact" | "ivf" | "hnsw".
        top_k, top_p, tau, mode, m, keep_original: See :func:`draw_targets`.
        rng: Source of all randomness.
        cache_dir: Where to cache the neighbourhoods (.npz); None = no cache.

    Returns:
        SamplerResult; ``targets[i]`` are indices into ``responses``.
    """
    if len(contexts) != len(responses):
        raise DataError("corpus", f"{len(contexts)} contexts but {len(responses)} responses")
    check_texts(responses, "responses")
    sharpen.check_params(tau=tau, top_k=top_k, top_p=top_p, mode=mode, m=m)
    nb = prepare_neighbourhoods(ctx_emb, resp_emb, k=k, eps=eps, neighbours=neighbours,
                                cache_dir=cache_dir)
    return draw_targets(nb, original_mask(nb, responses), top_k=top_k, top_p=top_p, tau=tau,
                        mode=mode, m=m, keep_original=keep_original, rng=rng)


def as_multi_target(contexts: Sequence[str], responses: Sequence[str],
                    result: SamplerResult) -> list[MultiTargetExample]:
    """Turn sampled indices into MultiTargetExample records (B.2 step 10)."""
    return [MultiTargetExample(context=c, targets=tuple(responses[t] for t in row), original=r)
            for c, r, row in zip(contexts, responses, result.targets.tolist(), strict=True)]
