"""Context neighbours for ISAAC (docs/methods.md B.2 step 3): cosine top-K, self included.

The authors put L2-normalised context embeddings in ``faiss.IndexFlatIP`` and query every row for
its K=150 nearest rows, i.e. exact cosine top-K over the whole corpus, the row itself included.
:func:`topk_cosine` does the same exactly, without ever holding an N x N matrix: it multiplies
row blocks by column blocks (each block <= ~128 MB) and keeps a running top-K per row. After the
first column block, a column can only enter a row's top-K if its similarity is >= that row's
current K-th best, so each later block costs one comparison pass plus a merge of the few
candidates; the matrix product itself is the floor (2*N^2*d flops, see bench/isaac.py).
Products use numpy's OpenBLAS sgemm (178 GFLOP/s on the project's 2-core CPU against 106 for
``torch.matmul``); row blocks run on worker threads with single-threaded BLAS each.

Determinism (``IndexFlatIP`` has none: its order of near-ties changes with the thread count and
the query batching). sgemm's rounding of an element depends on where it falls in the kernel's
tiles and on how threads split the call (OpenBLAS's Haswell/Zen kernels differ in the last bit
between block shapes). So every product is one canonical call: global rows
``[t * _TILE_ROWS, (t + 1) * _TILE_ROWS)`` against a column block whose bounds depend on (N, K)
only, always on single-threaded BLAS; ``chunk_rows`` and ``workers`` only group those calls.
Ties are broken by index everywhere: each (similarity, index) pair is packed into one int64 key
that orders by similarity, then by the smaller index.

:func:`topk_faiss` is the approximate alternative (HNSW or IVF) for very large corpora.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from safealign.isaac.parallel import run_tasks

_MAX_COLS = 16384  # widest column block
_TILE_ROWS = 512  # rows per sgemm call: fixed, so results never depend on blocking (docstring)
_TASK_ROWS = 2048  # default rows per task (selection granularity; a multiple of _TILE_ROWS)
_LOW32 = np.int64(0xFFFFFFFF)
_MIN_KEY = np.iinfo(np.int64).min


def _normalised(emb: np.ndarray, k: int) -> np.ndarray:
    """L2-normalised float32 rows, after checking 1 <= k <= N."""
    x = l2_normalise(emb)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(x) < k:
        raise ValueError(f"k={k} neighbours requested but the corpus has only {len(x)} rows")
    return x


def l2_normalise(emb: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32; all-zero rows stay zero (cosine 0 with everything)."""
    x = np.ascontiguousarray(emb, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, d), got shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"embedding row {int(np.flatnonzero(bad)[0])} is not finite (NaN/inf)")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0).astype(np.float32)


def _encode(vals: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Pack (float32 similarity, index) into int64 keys: larger similarity first, then smaller index."""
    bits = (vals + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64)
    return (ordered << 32) | (_LOW32 - idx.astype(np.int64))


def _decode(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = _LOW32 - (keys & _LOW32)
    ordered = (keys >> 32).astype(np.int32)
    bits = np.where(ordered < 0, ordered ^ np.int32(0x7FFFFFFF), ordered)
    return idx, bits.view(np.float32)


def _topk_keys(keys: np.ndarray, k: int) -> np.ndarray:
    """Row-wise k largest int64 keys (unsorted). Keys are unique per row, so this is exact."""
    return torch.topk(torch.from_numpy(keys), k, dim=1, sorted=False).values.numpy()


def _merge(state: np.ndarray, rows: np.ndarray, cand_keys: np.ndarray, k: int) -> np.ndarray:
    """Merge per-row candidate keys (``rows`` sorted ascending) into the (R, k) running top-k."""
    counts = np.bincount(rows, minlength=len(state))
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(rows)) - starts[rows]  # position of each candidate within its row
    buf = np.full((len(state), k + int(counts.max())), _MIN_KEY, dtype=np.int64)
    buf[:, :k] = state
    buf[rows, k + rank] = cand_keys
    return _topk_keys(buf, k)


def _column_blocks(n: int, k: int, max_cols: int) -> list[tuple[int, int]]:
    """Column blocks that start narrow and double: the first (>= k columns) seeds each row's
    top-k with one exact ``topk``; every later block only needs a compare, because the running
    k-th best has already risen, so ever fewer columns qualify (about k * width / seen)."""
    bounds, c0, width = [], 0, min(n, max(2048, k))
    while c0 < n:
        c1 = min(n, c0 + width)
        bounds.append((c0, c1))
        c0, width = c1, min(max_cols, 2 * width)
    return bounds


def _rowblock_topk(
    xr: np.ndarray, x: np.ndarray, k: int, blocks: list, sbuf: np.ndarray, mbuf: np.ndarray
) -> np.ndarray:
    """Exact top-k keys of one row block against all rows of ``x``, column block by column block.
    ``sbuf``/``mbuf`` are flat scratch buffers (BLAS needs a C-contiguous ``out``)."""
    r = len(xr)
    state = np.full((r, k), _MIN_KEY, dtype=np.int64)
    for c0, c1 in blocks:
        s = sbuf[: r * (c1 - c0)].reshape(r, -1)  # cosine block, one canonical sgemm per tile
        for t0 in range(0, r, _TILE_ROWS):
            np.matmul(xr[t0 : t0 + _TILE_ROWS], x[c0:c1].T, out=s[t0 : t0 + _TILE_ROWS])
        if c0 == 0:  # the first block has >= k columns: its k-th best value bounds the top-k
            thr = torch.topk(torch.from_numpy(s), k, dim=1, sorted=False).values.amin(dim=1)
            thr = thr.numpy()
        else:
            thr = _decode(state.min(axis=1))[1]  # each row's current k-th best similarity
        # ">=" keeps every tie at the threshold; the key merge then prefers smaller indices
        mask = np.greater_equal(s, thr[:, None], out=mbuf[: s.size].reshape(r, -1))
        flat = np.flatnonzero(mask)
        if len(flat):
            rows, cc = np.divmod(flat, c1 - c0)
            state = _merge(state, rows, _encode(s.ravel()[flat], cc + c0), k)
    return state


def topk_cosine(
    emb: np.ndarray, k: int, chunk_rows: int | None = None, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-K neighbours of every row among all rows, itself included (B.2 step 3).

    Args:
        emb: Embeddings, Shape: (N, d); L2-normalised here (cosine = inner product).
        k: Neighbours per row, 1 <= k <= N.
        chunk_rows: Rows per task, rounded up to whole sgemm tiles of ``_TILE_ROWS`` (default:
            2048, about 170 MB of block buffers per worker). Results do not depend on it.
        workers: Tasks processed in parallel, each with single-threaded BLAS, so the selection
            work runs in parallel too (default: min(8, CPUs)). Results do not depend on it.

    Returns:
        ``(idx, sims)``: idx Shape: (N, k) int64, sims Shape: (N, k) float32, each row sorted by
        similarity descending, ties by the smaller index.

    Raises:
        ValueError: k < 1, fewer rows than k, or a non-finite row.
    """
    x = _normalised(emb, k)
    n = len(x)
    rows = _task_rows(n, chunk_rows)
    tasks = [(np.arange(r0, min(n, r0 + rows)), None) for r0 in range(0, n, rows)]
    return _sorted(_run_tasks(x, k, tasks, rows, workers))


def _task_rows(n: int, chunk_rows: int | None) -> int:
    """Rows per task: whole sgemm tiles, so every task starts on a tile boundary."""
    tiles = -(-max(1, chunk_rows or _TASK_ROWS) // _TILE_ROWS)
    return min(n, tiles * _TILE_ROWS)


def _run_tasks(x: np.ndarray, k: int, tasks: list, rows: int, workers: int | None) -> np.ndarray:
    """Top-k keys for each task (query rows, candidate rows or None = all), run on ``workers``
    threads with per-thread block buffers. Keys carry global indices."""
    keys = np.empty((len(x), k), dtype=np.int64)
    max_cols = min(len(x), _MAX_COLS)
    local = threading.local()

    def run(task: tuple[np.ndarray, np.ndarray | None]) -> None:
        q, cand = task
        if not hasattr(local, "sbuf"):  # per-thread block buffers, reused across tasks
            local.sbuf = np.empty(rows * max_cols, dtype=np.float32)
            local.mbuf = np.empty(rows * max_cols, dtype=bool)
        xc = x if cand is None else x[cand]
        blocks = _column_blocks(len(xc), k, max_cols)
        got = _rowblock_topk(x[q], xc, k, blocks, local.sbuf, local.mbuf)
        if cand is not None:  # local candidate positions -> global row indices
            pos, sims = _decode(got)
            got = _encode(sims, cand[pos])
        keys[q] = got

    run_tasks(run, tasks, workers)  # a threaded sgemm would split calls differently run to run
    return keys


def _sorted(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(idx, sims) of each row sorted by descending key == (similarity desc, index asc)."""
    idx, sims = _decode(np.sort(keys, axis=1)[:, ::-1])
    return idx, np.ascontiguousarray(sims)


def _exact_rows(x: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k for a few rows (used where FAISS returned fewer than k hits)."""
    s = x[rows] @ x.T
    keys = _encode(s, np.broadcast_to(np.arange(len(x)), s.shape))
    return _decode(_topk_keys(keys, k))


def _ivf_tasks(x: np.ndarray, k: int, rows: int, seed: int, **params: int) -> list:
    """IVF probing with a FAISS spherical k-means coarse quantiser, scanned as blocked GEMMs.

    Queries are grouped by their nearest centroid (their list); a group is scanned exactly against
    the members of the ``nprobe`` lists nearest to its centroid (list-level probing; a query near
    a list boundary finds the neighbouring list among its own list's nearest). Scanning a group
    at once turns FAISS's one-query-at-a-time list scans (memory-bound) into matrix products."""
    import faiss

    n, d = x.shape
    nlist = int(params.get("nlist", max(1, min(int(np.sqrt(n)), n // 39))))
    nprobe = min(nlist, int(params.get("nprobe", 8)))
    n_train = min(n, 64 * nlist)  # k-means cost ~ niter * n_train * nlist
    train = x if n_train == n else x[np.random.default_rng(seed).choice(n, n_train, replace=False)]
    km = faiss.Kmeans(d, nlist, niter=int(params.get("niter", 10)), seed=seed, spherical=True)
    km.train(train)
    _, home = km.index.search(x, 1)  # each query's list
    _, near = km.index.search(km.centroids, nprobe)  # each list's nprobe nearest lists
    order = np.argsort(home[:, 0], kind="stable")
    bounds = np.searchsorted(home[order, 0], np.arange(nlist + 1))
    members = [order[bounds[c] : bounds[c + 1]] for c in range(nlist)]
    tasks = []
    for c, q in enumerate(members):
        if not len(q):
            continue
        cand = np.sort(np.concatenate([members[j] for j in np.union1d(near[c], [c])]))
        cand = cand if len(cand) >= k else None  # too few candidates: scan everything
        tasks += [(q[r0 : r0 + rows], cand) for r0 in range(0, len(q), rows)]
    return tasks


def _hnsw(x: np.ndarray, k: int, **params: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexHNSWFlat(x.shape[1], int(params.get("m", 32)), faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = int(params.get("ef_construction", 80))
    index.hnsw.efSearch = max(k, int(params.get("ef_search", 256)))
    index.add(x)
    sims, idx = index.search(x, k)
    missing = np.flatnonzero((idx < 0).any(axis=1))
    if len(missing):  # HNSW found fewer than k: complete those rows exactly
        idx[missing], sims[missing] = _exact_rows(x, missing, k)
    own = (idx == np.arange(len(x))[:, None]).any(axis=1)
    rows = np.flatnonzero(~own)
    idx[rows, -1] = rows  # force self in (the exact search always finds it), dropping the weakest
    sims[rows, -1] = np.einsum("ij,ij->i", x[rows], x[rows])
    return _sorted(_encode(sims, idx))


def topk_faiss(
    emb: np.ndarray,
    k: int,
    method: str = "ivf",
    *,
    seed: int = 0,
    threads: int | None = None,
    workers: int | None = None,
    **params: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate cosine top-K with FAISS structures; same contract as :func:`topk_cosine`.

    Args:
        emb: Embeddings, Shape: (N, d).
        k: Neighbours per row, self included.
        method: "ivf" - FAISS spherical k-means lists, probed lists scanned exactly with GEMMs
            (:func:`_ivf_tasks`; deterministic for a fixed seed); "hnsw" - IndexHNSWFlat (its
            graph built on several threads can differ run to run: threads=1 reproduces it).
        seed: Seed for the k-means initialisation and its training subsample.
        threads: FAISS OpenMP threads (default: FAISS's own default).
        workers: Scan threads for "ivf" (as in :func:`topk_cosine`).
        **params: ``nlist`` (sqrt N), ``nprobe`` (8), ``niter`` (10) for "ivf";
            ``m`` (32), ``ef_construction`` (80), ``ef_search`` (256) for "hnsw".

    Returns:
        ``(idx, sims)``, Shape: (N, k) each, rows sorted by (similarity desc, index asc).
    """
    import faiss

    x = _normalised(emb, k)
    if threads is not None:
        faiss.omp_set_num_threads(int(threads))
    if method == "hnsw":
        return _hnsw(x, k, **params)
    if method != "ivf":
        raise ValueError(f"method must be 'ivf' or 'hnsw', got {method!r}")
    rows = _task_rows(len(x), None)
    return _sorted(_run_tasks(x, k, _ivf_tasks(x, k, rows, seed, **params), rows, workers))


def recall_at_k(approx_idx: np.ndarray, exact_idx: np.ndarray) -> float:
    """Mean fraction of each row's exact top-K that the approximate top-K also found."""
    hits = sum(
        len(np.intersect1d(a, e, assume_unique=True))
        for a, e in zip(approx_idx, exact_idx, strict=True)
    )
    return hits / exact_idx.size
