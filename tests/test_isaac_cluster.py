"""ISAAC context neighbours (docs/methods.md B.2 step 3) and content clustering (step 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.cluster import DBSCAN

from safealign.isaac.cluster import _plan, cluster_sizes, dbscan_neighbourhoods
from safealign.isaac.neighbours import recall_at_k, topk_cosine, topk_faiss


def _brute_topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: float64 cosine, full sort by (similarity desc, index asc)."""
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    n = len(x)
    order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), -s), axis=1)[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


def _blobs(rng, n, d, centres, spread, scale=3.0):
    c = rng.standard_normal((centres, d)) * scale
    return (c[rng.integers(0, centres, n)] + rng.standard_normal((n, d)) * spread).astype(
        np.float32
    )


@pytest.mark.parametrize(("chunk_rows", "workers"), [(None, 1), (7, 2), (64, 2), (300, 1)])
def test_topk_cosine_matches_brute_force(chunk_rows, workers):
    rng = np.random.default_rng(0)
    x = _blobs(rng, 2600, 16, 12, 1.0)  # > 2048 rows: exercises the later column blocks
    x[10] = x[20] * 3.0  # same direction: a cosine tie with row 20, broken by index
    idx, sims = topk_cosine(x, 40, chunk_rows=chunk_rows, workers=workers)
    ref_idx, ref_sims = _brute_topk(x, 40)
    assert idx.dtype == np.int64 and sims.dtype == np.float32 and idx.shape == (2600, 40)
    np.testing.assert_allclose(sims, ref_sims, atol=2e-6)
    # identical except where float32 rounding reorders near-equal similarities
    assert (idx == ref_idx).mean() > 0.999
    assert (idx[:, 0] == np.arange(2600)).mean() > 0.99  # self first (B.2 step 3)
    assert list(idx[10, :2]) == [10, 20] and list(idx[20, :2]) == [10, 20]


def test_topk_cosine_exact_ties_break_by_index():
    x = np.zeros((6, 2), np.float32)
    x[:, 0] = 1.0  # six identical directions: every similarity is exactly 1
    idx, sims = topk_cosine(x, 4)
    assert (idx == np.arange(4)).all() and (sims == 1.0).all()


def test_topk_cosine_errors():
    x = np.ones((5, 3), np.float32)
    with pytest.raises(ValueError, match="only 5 rows"):
        topk_cosine(x, 6)
    with pytest.raises(ValueError, match="k must be"):
        topk_cosine(x, 0)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="row 3"):
        topk_cosine(x, 2)


@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_faiss_recall_and_determinism(method):
    rng = np.random.default_rng(1)
    x = _blobs(rng, 3000, 32, 30, 1.0)
    exact, _ = topk_cosine(x, 50)
    idx, sims = topk_faiss(x, 50, method=method, threads=1)
    assert idx.shape == (3000, 50) and (idx[:, 0] == np.arange(3000)).mean() > 0.99
    assert recall_at_k(idx, exact) >= 0.95
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # sorted, best first
    idx2, _ = topk_faiss(x, 50, method=method, threads=1)
    np.testing.assert_array_equal(idx, idx2)


def _sklearn_labels(x: np.ndarray, neigh: np.ndarray, eps: float) -> np.ndarray:
    return np.stack([DBSCAN(eps=eps, min_samples=1).fit(x[row]).labels_ for row in neigh])


@pytest.mark.parametrize(
    ("spread", "eps"), [(0.5, 1.2), (0.3, 0.6), (1.0, 2.5), (0.3, 1e-4), (0.3, 1e4)]
)
def test_dbscan_matches_sklearn(spread, eps):
    rng = np.random.default_rng(2)
    x = _blobs(rng, 500, 6, 5, spread)
    neigh = np.stack([rng.permutation(500)[:40] for _ in range(120)])
    labels = dbscan_neighbourhoods(x, neigh, eps, batch_size=17)
    assert labels.dtype == np.int32 and labels.shape == (120, 40)
    np.testing.assert_array_equal(labels, _sklearn_labels(x, neigh, eps))
    if eps == 1e-4:
        assert (labels == np.arange(40)).all()  # all singletons
    if eps == 1e4:
        assert (labels == 0).all()  # one cluster


def test_dbscan_non_trivial_and_duplicates():
    rng = np.random.default_rng(3)
    x = _blobs(rng, 300, 8, 4, 0.4)
    x[5] = x[6]  # duplicate response: distance 0
    neigh = np.stack([np.concatenate([[5, 6], rng.permutation(300)[:30]]) for _ in range(50)])
    labels = dbscan_neighbourhoods(x, neigh, 1.5)
    np.testing.assert_array_equal(labels, _sklearn_labels(x, neigh, 1.5))
    assert 1 < labels.max(axis=1).mean() + 1 < 32  # neither all singletons nor one cluster
    assert (labels[:, 0] == labels[:, 1]).all()


@pytest.mark.parametrize("eps", [1.0, np.nextafter(1.0, 0.0)])
def test_dbscan_boundary_distance_equal_to_eps(eps):
    # unit grid far from the origin: neighbour distances are exactly 1.0; sklearn counts
    # dist <= eps, so eps=1 chains the grid and the next float below 1 leaves singletons
    g = np.array([[i, j] for i in range(8) for j in range(8)], np.float32) + 1000.0
    neigh = np.stack([np.random.default_rng(i).permutation(64)[:30] for i in range(10)])
    labels = dbscan_neighbourhoods(g, neigh, eps)
    np.testing.assert_array_equal(labels, _sklearn_labels(g, neigh, eps))
    if eps < 1.0:
        assert (labels == np.arange(30)).all()


def test_dbscan_normalise_flag_and_errors():
    rng = np.random.default_rng(4)
    x = _blobs(rng, 100, 5, 3, 0.5)
    neigh = np.stack([rng.permutation(100)[:20] for _ in range(10)])
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_array_equal(
        dbscan_neighbourhoods(x, neigh, 0.1, normalise=True), _sklearn_labels(xn, neigh, 0.1)
    )
    with pytest.raises(ValueError, match="eps"):
        dbscan_neighbourhoods(x, neigh, 0.0)
    x[7] = np.inf
    with pytest.raises(ValueError, match="row 7"):
        dbscan_neighbourhoods(x, neigh, 0.5)


def test_cluster_sizes_first_encounter_order():
    assert cluster_sizes(np.array([0, 1, 1, 2, 0, 1])).tolist() == [2, 3, 1]
    assert cluster_sizes(np.array([0, 0, 0])).tolist() == [3]


def test_dbscan_shared_union_path_matches_sklearn():
    # ISAAC's square case (one response per context, neighbours from the context top-K): groups
    # of contexts with overlapping lists share one Gram matrix; labels must not change
    rng = np.random.default_rng(5)
    topic = rng.integers(0, 4, 600)
    ctx = rng.standard_normal((4, 16))[topic] + 0.3 * rng.standard_normal((600, 16))
    resp = rng.standard_normal((12, 16))[topic * 3 + rng.integers(0, 3, 600)]
    resp = (resp + 0.15 * rng.standard_normal((600, 16))).astype(np.float32)
    neigh, _ = topk_cosine(ctx.astype(np.float32), 60)
    shared = dbscan_neighbourhoods(resp, neigh, 1.0)
    np.testing.assert_array_equal(shared, dbscan_neighbourhoods(resp, neigh, 1.0, shared=False))
    rows = rng.choice(600, 80, replace=False)
    np.testing.assert_array_equal(shared[rows], _sklearn_labels(resp, neigh[rows], 1.0))
    assert 2 < shared.max(axis=1).mean() + 1 < 30
    # contexts of groups too small to share a Gram matrix joined a neighbour's group: every
    # context sits in exactly one task, and none needs a (K x K) Gram matrix of its own here
    tasks = _plan(neigh, True, 64)
    np.testing.assert_array_equal(np.sort(np.concatenate([r for r, _ in tasks])), np.arange(600))
    assert all(union is not None for _, union in tasks)


def test_topk_cosine_independent_of_blocking_and_threads():
    rng = np.random.default_rng(6)
    x = _blobs(rng, 2300, 24, 8, 0.7)
    ref = topk_cosine(x, 30)
    for chunk_rows, workers in [(5, 2), (1000, 1), (2300, 2)]:
        idx, sims = topk_cosine(x, 30, chunk_rows=chunk_rows, workers=workers)
        np.testing.assert_array_equal(idx, ref[0])
        np.testing.assert_array_equal(sims, ref[1])


_KERNEL_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from tests.test_isaac_cluster import _blobs
from safealign.isaac.neighbours import topk_cosine
x = _blobs(np.random.default_rng(6), 2300, 24, 8, 0.7)
out = [topk_cosine(x, 30, chunk_rows=c, workers=w) for c, w in [(None, None), (7, 2), (1000, 1)]]
np.savez({path!r}, **{{f"i{{j}}": o[0] for j, o in enumerate(out)}},
         **{{f"s{{j}}": o[1] for j, o in enumerate(out)}})
"""


def _has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx2(), reason="the Haswell/Zen sgemm kernels need AVX2")
def test_topk_cosine_independent_of_blocking_under_every_blas_kernel(tmp_path):
    """The clean-machine failure: OpenBLAS's Haswell/Zen sgemm rounds differently per call shape
    and thread split. Under each kernel, blocking and workers must not change a bit."""
    root = str(Path(__file__).resolve().parents[1])
    for kernel in ["Haswell", "Zen", None]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
        if kernel:
            env["OPENBLAS_CORETYPE"] = kernel
        path = str(tmp_path / f"{kernel}.npz")
        script = _KERNEL_SCRIPT.format(root=root, path=path)
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
        res = np.load(path)
        for j in (1, 2):
            np.testing.assert_array_equal(res[f"i{j}"], res["i0"], err_msg=str(kernel))
            np.testing.assert_array_equal(res[f"s{j}"], res["s0"], err_msg=str(kernel))
