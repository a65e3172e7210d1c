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

Neighbouring contexts have overlapping neighbour lists, so a group of G such contexts often has a
union of U << G*K responses; then one (U x U) Gram matrix replaces G (K x K) ones (steps 1-3 on
the union, each context's graph is a sub-matrix). The labels are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from safealign.isaac.neighbours import default_workers, single_threaded_kernels

_U32 = 2.0**-24  # unit roundoff of float32
_UNION_MAX = 4096  # largest shared Gram matrix (U x U float32 = 64 MB)


def _check_inputs(resp_emb: np.ndarray, neigh_idx: np.ndarray, eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if resp_emb.ndim != 2 or neigh_idx.ndim != 2:
        raise ValueError(
            f"expected resp_emb (N, d) and neigh_idx (N, K), got {resp_emb.shape}, "
            f"{neigh_idx.shape}"
        )
    if neigh_idx.size and (neigh_idx.min() < 0 or neigh_idx.max() >= len(resp_emb)):
        raise ValueError(f"neigh_idx has indices outside [0, {len(resp_emb)})")
    bad = ~np.isfinite(resp_emb).all(axis=1)
    if bad.any():
        raise ValueError(f"response embedding row {int(np.flatnonzero(bad)[0])} is not finite")


def _adjacency(x: torch.Tensor, exact: Callable, eps: float) -> torch.Tensor:
    """Boolean (B, K, K) graph dist <= eps for a batch of point sets ``x`` (B, K, d).

    ``x`` is overwritten (centred in place); ``exact(b, i, j)`` returns float64 squared distances
    of the original vectors, used for pairs too close to eps to trust float32."""
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
        adj[b, i, j] = exact(b, i, j) <= eps2
    adj.diagonal(dim1=1, dim2=2).fill_(True)  # a point is its own neighbour (dist 0)
    return adj


def _exact_d2(table: torch.Tensor, rows: torch.Tensor) -> Callable:
    """float64 squared distance between table[rows[b, i]] and table[rows[b, j]]."""

    def d2(b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        diff = table[rows[b, i]].double() - table[rows[b, j]].double()
        return (diff * diff).sum(-1)

    return d2


def _components(adj: np.ndarray) -> np.ndarray:
    """Connected components of each (K, K) graph as the minimum node index of the component.

    Min-label propagation: a node's label becomes the smallest label among its neighbours, with
    pointer jumping (label -> label of label) in between; a fixed point labels every node with
    the smallest index of its component. Masked minima use uint8 max/min (K <= 255)."""
    bsz, k, _ = adj.shape
    dt = np.uint8 if k <= 255 else np.uint16
    not_adj = (~adj).astype(dt) * np.iinfo(dt).max  # neighbour -> 0, otherwise dtype max
    lab = adj.argmax(axis=2).astype(dt)  # first neighbour = smallest index (self is one)
    active = np.arange(bsz)
    while len(active):
        la = lab[active]
        na = not_adj if len(active) == bsz else not_adj[active]
        new = np.minimum(np.maximum(na, la[:, None, :]).min(axis=2), la)
        for _ in range(8):  # pointer jumping
            jumped = np.take_along_axis(new, new.astype(np.intp), axis=1)
            if np.array_equal(jumped, new):
                break
            new = jumped
        changed = (new != la).any(axis=1)
        lab[active] = new
        active = active[changed]
    return lab


def _sklearn_order(roots: np.ndarray) -> np.ndarray:
    """Map component roots (min index) to 0..C-1 numbered by lowest point index (sklearn's order)."""
    k = roots.shape[1]
    rank = np.cumsum(roots == np.arange(k), axis=1, dtype=np.int32) - 1
    return np.take_along_axis(rank, roots.astype(np.intp), axis=1)


def dbscan_neighbourhoods(
    resp_emb: np.ndarray,
    neigh_idx: np.ndarray,
    eps: float,
    batch_size: int = 256,
    normalise: bool = False,
    shared: bool = True,
    workers: int | None = None,
) -> np.ndarray:
    """DBSCAN(eps, min_samples=1, Euclidean) labels of every context's neighbour responses (B.2 step 4).

    Args:
        resp_emb: Response embeddings, Shape: (N, d). Un-normalised as the authors did.
        neigh_idx: Neighbour rows of each context, Shape: (N, K) (B.2 step 3).
        eps: DBSCAN radius; distance <= eps joins two points, as in sklearn.
        batch_size: Contexts per per-context batch (memory ~ batch_size * K * (d + K) * 8 bytes).
        normalise: L2-normalise the response vectors first (not what the authors did).
        shared: Let groups of contexts with overlapping neighbour lists share one Gram matrix
            over the union of their neighbours when that is cheaper (same labels either way).
            Needs one response per context (``len(resp_emb) == N``), as in ISAAC.
        workers: Threads, each running single-threaded kernels on its own tasks (default:
            min(2, CPUs)); results do not depend on it.

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
    neigh = np.ascontiguousarray(neigh_idx, dtype=np.int64)
    out = np.empty((n, k), dtype=np.int32)
    shared = shared and len(x) == n  # neighbour ids double as context ids (prepare_neighbourhoods)
    tasks = _plan(neigh, shared, batch_size)

    def run(task: tuple[np.ndarray, np.ndarray | None]) -> None:
        rows, union = task
        if union is None:  # per-context Gram matrices
            idx = torch.from_numpy(neigh[rows])
            xb = torch.index_select(table, 0, idx.reshape(-1)).view(len(rows), k, -1)
            out[rows] = _labels(_adjacency(xb, _exact_d2(table, idx), eps))
        else:
            out[rows] = _labels_shared(table, union, neigh[rows], eps)

    workers = min(default_workers(workers), len(tasks))
    with single_threaded_kernels(workers > 1):  # small kernels: parallel over tasks instead
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, tasks))
        else:
            for task in tasks:
                run(task)
    return out


def _plan(neigh: np.ndarray, shared: bool, batch_size: int) -> list:
    """Tasks (rows, union or None): locality groups whose union Gram matrix is cheaper than
    their per-context ones share it; all other contexts go in per-context batches."""
    n, k = neigh.shape
    tasks, pending = [], []
    for group in _locality_groups(neigh) if shared else [np.arange(n)]:
        union = np.unique(neigh[group]) if shared else np.arange(0)
        if shared and len(union) <= _UNION_MAX and len(union) ** 2 <= 0.5 * len(group) * k * k:
            tasks.append((group, union))
        else:
            pending.append(group)
    rest = np.concatenate(pending) if pending else np.arange(0)
    tasks += [(rest[s : s + batch_size], None) for s in range(0, len(rest), batch_size)]
    return tasks


def _labels(adj: torch.Tensor) -> np.ndarray:
    return _sklearn_order(_components(adj.numpy()))


def _labels_shared(table, union: np.ndarray, neigh: np.ndarray, eps: float) -> np.ndarray:
    """Shared path: contexts whose neighbour lists overlap (a locality group) share one Gram
    matrix over the union of their neighbours; each context's graph is a sub-matrix of it."""
    u = torch.from_numpy(union)
    adj = _adjacency(table[u][None], _exact_d2(table, u[None]), eps)[0]  # (U, U)
    pos = torch.from_numpy(np.searchsorted(union, neigh))  # (G, K) positions in the union
    g, k = pos.shape
    rows = adj.index_select(0, pos.reshape(-1)).view(g, k, -1)  # (G, K, U)
    return _labels(torch.gather(rows, 2, pos[:, None, :].expand(g, k, k)))  # (G, K, K)


def _locality_groups(neigh: np.ndarray) -> list[np.ndarray]:
    """Greedy groups of contexts with overlapping neighbour lists: each unassigned context takes
    its still unassigned neighbours (its list holds contexts whose own lists overlap with it)."""
    taken = np.zeros(len(neigh), dtype=bool)
    groups = []
    for i in range(len(neigh)):
        if taken[i]:
            continue
        cand = neigh[i][~taken[neigh[i]]]
        group = np.concatenate([[i], cand[cand != i]])
        taken[group] = True
        groups.append(group)
    return groups


def cluster_sizes(labels_row: np.ndarray) -> np.ndarray:
    """Cluster sizes of one neighbourhood in first-encounter order (= label order 0..C-1)."""
    labels_row = np.asarray(labels_row)
    if labels_row.size and labels_row.min() < 0:
        raise ValueError("labels must be >= 0 (min_samples=1 DBSCAN has no noise label)")
    _, first, counts = np.unique(labels_row, return_index=True, return_counts=True)
    return counts[np.argsort(first, kind="stable")]
