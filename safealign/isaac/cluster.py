"""Content clustering for ISAAC (METHODS.md B.2 step 4): DBSCAN of each context's K neighbours.

The authors call ``sklearn.cluster.DBSCAN(eps, min_samples=1)`` (Euclidean, un-normalised response
vectors) once per dialogue on the responses of its K=150 context neighbours. With
``min_samples=1`` every point is a core point, so DBSCAN's clusters are exactly the connected
components of the graph "dist(i, j) <= eps" (sklearn counts distance == eps as a neighbour) and
there is never a noise label -1. That lets us do all neighbourhoods in batches:

1. gather the (B, K, d) response vectors, centre each neighbourhood (distances are
   shift-invariant, and centring shrinks the norms so the Gram trick below loses less precision);
2. squared distances from one batched matmul: ||x||^2 + ||y||^2 - 2 x.y;
3. pairs whose float32 distance is within a rounding bound of eps^2 are recomputed exactly
   in float64 from the original vectors, so the boundary matches sklearn;
4. connected components by min-label propagation with pointer jumping;
5. relabel in sklearn's order: clusters numbered by their lowest point index (sklearn's
   ``dbscan_inner`` visits points in index order), i.e. first-encounter order along the neighbour
   list, which is also the order ``Counter.most_common`` breaks ties by (B.2 step 5).
"""

from __future__ import annotations

import numpy as np
import torch

_U32 = 2.0**-24  # unit roundoff of float32


def _check_inputs(resp_emb: np.ndarray, neigh_idx: np.ndarray, eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if resp_emb.ndim != 2 or neigh_idx.ndim != 2:
        raise ValueError(f"expected resp_emb (N, d) and neigh_idx (N, K), got {resp_emb.shape}, "
                         f"{neigh_idx.shape}")
    if neigh_idx.size and (neigh_idx.min() < 0 or neigh_idx.max() >= len(resp_emb)):
        raise ValueError(f"neigh_idx has indices outside [0, {len(resp_emb)})")
    bad = ~np.isfinite(resp_emb).all(axis=1)
    if bad.any():
        raise ValueError(f"response embedding row {int(np.flatnonzero(bad)[0])} is not finite")


def _adjacency(x: torch.Tensor, x64: _Float64View, eps: float) -> torch.Tensor:
    """Boolean (B, K, K) graph dist <= eps for a batch of neighbourhoods ``x`` (B, K, d).

    ``x`` is overwritten (centred in place)."""
    bsz, k, d = x.shape
    x.sub_(x.mean(dim=1, keepdim=True))  # shift-invariant; smaller norms -> smaller Gram error
    sq = torch.linalg.vector_norm(x, dim=2).square_()  # (B, K)
    d2 = torch.baddbmm(sq[:, :, None] + sq[:, None, :], x, x.transpose(1, 2), alpha=-2.0)
    eps2 = eps * eps
    adj = d2 <= eps2
    # Rounding bound of the float32 Gram trick (dot products ~ d*u, centring ~ 4u, relative to
    # ||x_i||^2 + ||x_j||^2 <= 2 max ||x||^2); pairs this close to eps^2 are decided in float64
    # from the original vectors instead (step 3 of the module docstring).
    tol = (4 * d + 16) * _U32 * sq.amax(dim=1).view(bsz, 1, 1) + 1e-30
    b, i, j = torch.nonzero(d2.sub_(eps2).abs_() <= tol, as_tuple=True)
    if len(b):
        exact = ((x64[b, i] - x64[b, j]) ** 2).sum(-1)
        adj[b, i, j] = exact <= eps2
    adj.diagonal(dim1=1, dim2=2).fill_(True)  # a point is its own neighbour (dist 0)
    return adj


class _Float64View:
    """Lazy float64 access ``view[b, i]`` to rows of the table, used only for boundary pairs."""

    def __init__(self, table: torch.Tensor, idx: torch.Tensor) -> None:
        self.table, self.idx = table, idx

    def __getitem__(self, key: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, i = key
        return self.table[self.idx[b, i]].double()


def _components(adj: torch.Tensor) -> torch.Tensor:
    """Connected components of each (K, K) graph as the minimum node index of the component."""
    bsz, k, _ = adj.shape
    big = torch.tensor(k, dtype=torch.int16)
    lab = adj.to(torch.uint8).argmax(dim=2).to(torch.int16)  # first neighbour = min index
    active = torch.arange(bsz)
    while len(active):
        a, la = adj[active], lab[active]
        new = torch.where(a, la[:, None, :], big).amin(dim=2)  # min label over neighbours
        new = torch.minimum(new, la)
        for _ in range(8):  # pointer jumping: follow label -> label of label
            jumped = torch.gather(new, 1, new.long())
            if torch.equal(jumped, new):
                break
            new = jumped
        changed = (new != la).any(dim=1)
        lab[active] = new
        active = active[changed]
    return lab


def _sklearn_order(roots: torch.Tensor) -> torch.Tensor:
    """Map component roots (min index) to 0..C-1 numbered by lowest point index (sklearn's order)."""
    k = roots.shape[1]
    is_root = roots == torch.arange(k, dtype=roots.dtype)
    rank = torch.cumsum(is_root.to(torch.int32), dim=1) - 1
    return torch.gather(rank, 1, roots.long())


def dbscan_neighbourhoods(
    resp_emb: np.ndarray,
    neigh_idx: np.ndarray,
    eps: float,
    batch_size: int = 256,
    normalise: bool = False,
) -> np.ndarray:
    """DBSCAN(eps, min_samples=1, Euclidean) labels of every context's neighbour responses (B.2 step 4).

    Args:
        resp_emb: Response embeddings, Shape: (N, d). Un-normalised as the authors did.
        neigh_idx: Neighbour rows of each context, Shape: (N, K) (B.2 step 3).
        eps: DBSCAN radius; distance <= eps joins two points, as in sklearn.
        batch_size: Contexts per batch (memory ~ batch_size * K * d * 12 bytes).
        normalise: L2-normalise the response vectors first (not what the authors did).

    Returns:
        labels Shape: (N, K) int32, identical to ``DBSCAN(eps, min_samples=1).fit(X[neigh_idx[i]])``
        for every row i: clusters numbered 0.. by their lowest neighbour position.
    """
    resp_emb = np.asarray(resp_emb)
    _check_inputs(resp_emb, neigh_idx, eps)
    x = np.ascontiguousarray(resp_emb, dtype=np.float32)
    if normalise:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    n, k = neigh_idx.shape
    if k > 32767:
        raise ValueError(f"K={k} neighbours is more than the int16 labels support")
    table = torch.from_numpy(x)
    idx_all = torch.from_numpy(np.ascontiguousarray(neigh_idx, dtype=np.int64))
    out = np.empty((n, k), dtype=np.int32)
    buf = torch.empty((min(batch_size, n) * k, x.shape[1]), dtype=torch.float32)
    for s in range(0, n, batch_size):
        idx = idx_all[s : s + batch_size]
        xb = torch.index_select(table, 0, idx.reshape(-1), out=buf[: idx.numel()])
        xb = xb.view(len(idx), k, -1)
        adj = _adjacency(xb, _Float64View(table, idx), eps)
        out[s : s + len(idx)] = _sklearn_order(_components(adj)).numpy()
    return out


def cluster_sizes(labels_row: np.ndarray) -> np.ndarray:
    """Cluster sizes of one neighbourhood in first-encounter order (= label order 0..C-1)."""
    labels_row = np.asarray(labels_row)
    if labels_row.size and labels_row.min() < 0:
        raise ValueError("labels must be >= 0 (min_samples=1 DBSCAN has no noise label)")
    _, first, counts = np.unique(labels_row, return_index=True, return_counts=True)
    return counts[np.argsort(first, kind="stable")]
