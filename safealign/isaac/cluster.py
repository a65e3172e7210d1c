"""Content clustering for ISAAC (docs/methods.md B.2 step 4): DBSCAN of each context's K neighbours.

The authors call ``sklearn.cluster.DBSCAN(eps, min_samples=1)`` (Euclidean, un-normalised response
vectors) once per dialogue on the responses of its K=150 context neighbours. With
``min_samples=1`` every point is a core point, so DBSCAN's clusters are exactly the connected
components of the graph "dist(i, j) <= eps" (sklearn counts distance == eps as a neighbour) and
there is never a noise label -1. That lets us work on many neighbourhoods at once:

1. gather the response vectors of a set of neighbourhoods and centre them (distances are
   shift-invariant, and centring shrinks the norms so the Gram trick below loses less precision);
2. squared distances from one matmul: ||x||^2 + ||y||^2 - 2 x.y;
3. pairs whose float32 distance is within a rounding bound of eps^2 are recomputed exactly
   in float64 from the original vectors, so the boundary matches sklearn (and the labels do not
   depend on which vectors share a Gram matrix, nor on the BLAS kernel);
4. connected components by min-label propagation with pointer jumping;
5. relabel in sklearn's order: clusters numbered by their lowest point index (sklearn's
   ``dbscan_inner`` visits points in index order), i.e. first-encounter order along the neighbour
   list, which is also the order ``Counter.most_common`` breaks ties by (B.2 step 5).

Neighbouring contexts have overlapping neighbour lists, so a group of G such contexts often has a
union of U << G*K responses; then one (U x U) Gram matrix replaces G (K x K) ones (steps 1-3 on
the union, each context's graph is a sub-matrix). A context alone uses its own K neighbours.
"""

from __future__ import annotations

import numpy as np

from safealign.isaac.parallel import run_tasks

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


def _adjacency(rows: np.ndarray, table: np.ndarray, eps: float) -> np.ndarray:
    """Boolean (U, U) graph dist <= eps of the points ``table[rows]``.

    Pairs too close to eps to trust float32 are decided in float64 (module docstring, step 3)."""
    x = np.take(table, rows, axis=0)
    x -= x.mean(axis=0)  # shift-invariant; smaller norms -> smaller Gram error
    sq = np.einsum("ij,ij->i", x, x)
    d2 = x @ x.T  # numpy's syrk: ~1.5x torch.bmm on this CPU
    d2 *= -2.0
    d2 += sq[:, None]
    d2 += sq[None, :]
    eps2 = eps * eps
    adj = d2 <= eps2
    # Rounding bound of the float32 Gram trick (dot products ~ d*u, centring ~ 4u, relative to
    # ||x_i||^2 + ||x_j||^2 <= 2 max ||x||^2), whatever the summation order.
    tol = (4 * x.shape[1] + 16) * _U32 * sq.max() + 1e-30
    d2 -= eps2
    near = np.flatnonzero(np.abs(d2, out=d2) <= tol)  # few: faster than a 2-D nonzero
    if len(near):
        i, j = np.divmod(near, len(rows))
        diff = table[rows[i]].astype(np.float64) - table[rows[j]]
        adj.ravel()[near] = np.einsum("ij,ij->i", diff, diff) <= eps2
    np.fill_diagonal(adj, True)  # a point is its own neighbour (dist 0)
    return adj


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
        batch_size: Contexts per task among those that get a (K x K) Gram matrix of their own.
        normalise: L2-normalise the response vectors first (not what the authors did).
        shared: Let groups of contexts with overlapping neighbour lists share one Gram matrix
            over the union of their neighbours when that is cheaper (same labels either way).
            Needs one response per context (``len(resp_emb) == N``), as in ISAAC.
        workers: Threads, each running single-threaded kernels on its own tasks (default:
            min(8, CPUs)); results do not depend on it.

    Returns:
        labels Shape: (N, K) int32, identical to ``DBSCAN(eps, min_samples=1).fit(X[neigh_idx[i]])``
        for every row i: clusters numbered 0.. by their lowest neighbour position.
    """
    table = _response_table(resp_emb, neigh_idx, eps, normalise)
    neigh = np.ascontiguousarray(neigh_idx, dtype=np.int64)
    n, k = neigh.shape
    out = np.empty((n, k), dtype=np.int32)
    shared = shared and len(table) == n  # neighbour ids double as context ids (ISAAC's case)

    def run(task: tuple[np.ndarray, np.ndarray | None]) -> None:
        rows, union = task
        if union is not None:
            out[rows] = _group_labels(table, union, neigh[rows], eps)
            return
        for i in rows:  # a context alone: its own neighbour list is the union
            out[i] = _group_labels(table, np.unique(neigh[i]), neigh[i : i + 1], eps)[0]

    run_tasks(run, _plan(neigh, shared, batch_size), workers)  # small kernels: parallel tasks
    return out


def _response_table(
    resp_emb: np.ndarray, neigh_idx: np.ndarray, eps: float, normalise: bool
) -> np.ndarray:
    """Checked float32 response vectors, L2-normalised if asked."""
    resp_emb = np.asarray(resp_emb)
    _check_inputs(resp_emb, neigh_idx, eps)
    if neigh_idx.shape[1] > 32767:
        raise ValueError(f"K={neigh_idx.shape[1]} neighbours is more than the int16 labels support")
    x = np.ascontiguousarray(resp_emb, dtype=np.float32)
    if normalise:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    return x


def _plan(neigh: np.ndarray, shared: bool, batch_size: int) -> list:
    """Tasks (rows, union or None): locality groups whose union Gram matrix is cheaper than
    their per-context ones share it; all other contexts go in per-context batches."""
    n, k = neigh.shape
    tasks, pending = [], []
    for group in _sharing_groups(neigh) if shared else [np.arange(n)]:
        union = np.unique(neigh[group]) if shared else np.arange(0)
        if shared and _cheap(len(union), len(group), k):
            tasks.append((group, union))
        else:
            pending.append(group)
    rest = np.concatenate(pending) if pending else np.arange(0)
    tasks += [(rest[s : s + batch_size], None) for s in range(0, len(rest), batch_size)]
    return tasks


def _cheap(union: int, group: int, k: int) -> bool:
    """One (U x U) Gram matrix costs at most half of the group's (K x K) ones, within the cap."""
    return union <= _UNION_MAX and union * union <= 0.5 * group * k * k


def _sharing_groups(neigh: np.ndarray) -> list[np.ndarray]:
    """Locality groups; members of a group too small to share a Gram matrix join the group of
    their nearest neighbour that shares one. Their lists overlap that group's union, which
    barely grows (by 0.3 rows on average on bench/isaac.py's data), so their per-context Gram
    matrices (~40% of the time at 14% of the contexts) become nearly free."""
    n, k = neigh.shape
    groups = _locality_groups(neigh)
    gid = np.empty(n, dtype=np.int32)
    for g, rows in enumerate(groups):
        gid[rows] = g
    sharing = np.array([_cheap(len(np.unique(neigh[r])), len(r), k) for r in groups], dtype=bool)
    ok = sharing[gid[neigh]]  # (N, K): the neighbour's group shares a Gram matrix
    move = np.flatnonzero(~sharing[gid] & ok.any(axis=1))
    gid[move] = gid[neigh[move, ok[move].argmax(axis=1)]]  # the nearest such neighbour's group
    order = np.argsort(gid, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(gid[order])) + 1) if n else []


def _group_labels(
    table: np.ndarray, union: np.ndarray, neigh: np.ndarray, eps: float
) -> np.ndarray:
    """Labels of G contexts (neighbour lists ``neigh``, (G, K)) from one Gram matrix over the
    sorted ``union`` of their neighbours; each context's graph is a sub-matrix of it."""
    adj = _adjacency(union, table, eps)  # (U, U)
    pos = np.searchsorted(union, neigh)  # (G, K) positions in the union
    # one context's (K, K) graph per take pair: ~3x faster than one 3-D fancy index
    sub = np.stack([adj.take(p, axis=0).take(p, axis=1) for p in pos])  # (G, K, K)
    return _sklearn_order(_components(sub))


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
