"""The expensive, tau-independent half of ISAAC's sampler (paper Alg. 1 l.9-13; docs/methods.md B.2
steps 3-4): context top-K neighbours and DBSCAN of their responses, computed once and cached.

The cache is one .npz per (embeddings content, K, eps, search method, flags), written atomically
with its key and sha256 inside and read with ``allow_pickle=False`` (`safealign.cache.NPZ`); a
corrupt, mismatched or out-of-range file is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from safealign.cache import NPZ, FileCache, content_key
from safealign.errors import DataError
from safealign.isaac.cluster import dbscan_neighbourhoods
from safealign.isaac.neighbours import topk_cosine, topk_faiss

log = logging.getLogger(__name__)
_CACHE_VERSION = "isaac-neighbourhoods-v2"  # bump when the stored arrays' meaning changes


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


_CACHE = FileCache(NPZ, "neighbourhood cache")


def _out_of_range(arrays: dict[str, np.ndarray], n: int, k: int) -> str | None:
    """Why cached arrays cannot be these inputs' neighbourhoods (shapes, index ranges), or None."""
    idx, labels = arrays["neigh_idx"], arrays["labels"]
    if not idx.shape == labels.shape == arrays["sims"].shape == (n, k):
        return f"shapes {idx.shape}, {labels.shape}, {arrays['sims'].shape}, expected ({n}, {k})"
    if not (0 <= idx.min() and idx.max() < n and 0 <= labels.min() and labels.max() < k):
        return "neighbour indices or labels out of range"
    return None


def _check_args(ctx_emb: np.ndarray, resp_emb: np.ndarray, k, eps, neighbours: str) -> int:
    """Validate the inputs; returns K clamped to N (with a warning)."""
    if len(ctx_emb) != len(resp_emb):
        raise DataError(
            "embeddings", f"{len(ctx_emb)} context rows but {len(resp_emb)} response rows"
        )
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if neighbours not in ("exact", "ivf", "hnsw"):
        raise ValueError(f"neighbours must be 'exact', 'ivf' or 'hnsw', got {neighbours!r}")
    if k > len(ctx_emb):
        log.warning("k=%d neighbours but only %d rows: using k=%d", k, len(ctx_emb), len(ctx_emb))
        return len(ctx_emb)
    return k


def _compute(ctx_emb, resp_emb, k, eps, neighbours, normalise, batch_size, faiss_params) -> dict:
    if neighbours == "exact":
        idx, sims = topk_cosine(ctx_emb, k)
    else:
        idx, sims = topk_faiss(ctx_emb, k, method=neighbours, **faiss_params)
    labels = dbscan_neighbourhoods(resp_emb, idx, eps, batch_size=batch_size, normalise=normalise)
    return {"neigh_idx": idx, "sims": sims, "labels": labels, "settings": np.array(
        [repr(float(eps)), neighbours])}  # fmt: skip


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
        neighbours: "exact" (blocked cosine) or "ivf" / "hnsw" (approximate, see
            :func:`~safealign.isaac.neighbours.topk_faiss`).
        batch_size: Contexts per DBSCAN batch.
        faiss_params: Extra keyword arguments for :func:`topk_faiss`.
        cache_dir: Directory for the .npz cache (keyed by the embeddings' content, K, eps, method).

    Returns:
        Neighbourhoods.
    """
    k = _check_args(ctx_emb, resp_emb, k, eps, neighbours)
    n, faiss_params = len(ctx_emb), dict(faiss_params or {})
    key = content_key(_CACHE_VERSION, _digest(ctx_emb), _digest(resp_emb), k, eps, neighbours,
                      normalise_responses, faiss_params)  # fmt: skip
    path = Path(cache_dir) / f"neighbourhoods-{key}.npz" if cache_dir else None
    args = (ctx_emb, resp_emb, k, eps, neighbours, normalise_responses, batch_size, faiss_params)
    arrays = _CACHE.get_or_compute(
        path, key, lambda: _compute(*args), lambda a: _out_of_range(a, n, k)
    )
    eps_read, method = (str(v) for v in arrays["settings"])
    return Neighbourhoods(arrays["neigh_idx"].astype(np.int64), arrays["sims"],
                          arrays["labels"].astype(np.int32), k, float(eps_read), method, key)  # fmt: skip
