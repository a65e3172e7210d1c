"""The expensive, tau-independent half of ISAAC's sampler (paper Alg. 1 l.9-13; METHODS.md B.2
steps 3-4): context top-K neighbours and DBSCAN of their responses, computed once and cached.

The cache is one .npz per (embeddings content, K, eps, search method, flags), written atomically
and read with ``allow_pickle=False``; a corrupt or mismatched file is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from safealign.errors import DataError
from safealign.io import atomic_path, stable_hash
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


def _load_cached(path: Path, key: str, n: int, k: int) -> Neighbourhoods | None:
    """The cached neighbourhoods, or None if missing, corrupt or not for these inputs."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in ("neigh_idx", "sims", "labels", "key", "meta")}
        ok = (
            str(arrays["key"]) == key
            and arrays["neigh_idx"].shape == (n, k)
            and arrays["labels"].shape == (n, k)
            and arrays["sims"].shape == (n, k)
            and 0 <= arrays["neigh_idx"].min()
            and arrays["neigh_idx"].max() < n
            and 0 <= arrays["labels"].min()
            and arrays["labels"].max() < k
        )
        if not ok:
            raise ValueError("content does not match the inputs")
    except Exception as e:  # noqa: BLE001 - any unreadable cache is recomputed, never used
        log.warning("ignoring neighbourhood cache %s (%s); recomputing", path, e)
        return None
    eps, method = str(arrays["meta"][0]), str(arrays["meta"][1])
    return Neighbourhoods(
        arrays["neigh_idx"].astype(np.int64),
        arrays["sims"],
        arrays["labels"].astype(np.int32),
        k,
        float(eps),
        method,
        key,
    )


def _save(path: Path, nb: Neighbourhoods) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            neigh_idx=nb.neigh_idx,
            sims=nb.sims,
            labels=nb.labels,
            key=np.array(nb.key),
            meta=np.array([repr(nb.eps), nb.method]),
        )


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
    n = len(ctx_emb)
    if k > n:
        log.warning("k=%d neighbours but only %d rows: using k=%d", k, n, n)
        k = n
    faiss_params = dict(faiss_params or {})
    key = stable_hash(
        _CACHE_VERSION,
        _digest(ctx_emb),
        _digest(resp_emb),
        k,
        eps,
        neighbours,
        normalise_responses,
        faiss_params,
    )
    path = Path(cache_dir) / f"neighbourhoods-{key}.npz" if cache_dir else None
    if path is not None and (nb := _load_cached(path, key, n, k)) is not None:
        return nb
    if neighbours == "exact":
        idx, sims = topk_cosine(ctx_emb, k)
    else:
        idx, sims = topk_faiss(ctx_emb, k, method=neighbours, **faiss_params)
    labels = dbscan_neighbourhoods(
        resp_emb, idx, eps, batch_size=batch_size, normalise=normalise_responses
    )
    nb = Neighbourhoods(idx, sims, labels, k, float(eps), neighbours, key)
    if path is not None:
        _save(path, nb)
    return nb
