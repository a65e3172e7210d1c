"""Benchmark the ISAAC sampler: neighbour search, DBSCAN and sampling at N = 10k / 40k / 160k.

    .venv/bin/python bench/isaac.py                      # full run (several minutes)
    .venv/bin/python bench/isaac.py --sizes 10000,40000  # quicker

Synthetic but clustered 384-d data (so DBSCAN is not trivial): contexts are a mixture of
Gaussians on the sphere (topics); each topic has a few response "modes" with geometric
popularity, responses are tight Gaussians around their mode (eps=0.22 chains a mode together);
5% are outliers that stay singletons.

Floors: exact cosine search costs 2*N^2*d flops and the batched DBSCAN Gram matrices 2*N*K^2*d,
so each is divided by GEMM rates measured in this same run (a large matmul; a batched (K x d)
matmul); "ratio" = measured / floor. Peak RSS is the process's high-water mark. The baseline is
the authors' per-dialogue loop (one flat-index query and one sklearn DBSCAN per dialogue), timed
on a subset and extrapolated.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch


def synthetic(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    topics, modes = max(20, n // 400), 5
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    t_centres = unit(rng.standard_normal((topics, d)))
    r_centres = unit(rng.standard_normal((topics * modes, d)))
    topic = rng.integers(0, topics, n)
    mode = np.minimum(rng.geometric(0.45, n) - 1, modes - 1)
    ctx = unit(t_centres[topic] + rng.standard_normal((n, d)).astype(np.float32) * 0.04)
    noise = np.where(rng.random(n) < 0.05, 0.03, 0.0045).astype(np.float32)[:, None]
    resp = unit(r_centres[topic * modes + mode] + rng.standard_normal((n, d)).astype(np.float32)
                * noise)  # 5% outliers (distance ~0.8 > eps): singleton clusters
    return ctx, resp


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def gemm_rates(d: int, k: int) -> tuple[float, float]:
    """GFLOP/s of one large matmul and of the batched (K x d) Gram products, best of 3."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, d), dtype=np.float32)
    b = rng.standard_normal((16384, d), dtype=np.float32)
    x = torch.randn(256, k, d)
    big, small = [], []
    for _ in range(3):
        t = time.perf_counter()
        a @ b.T
        big.append(2 * 4096 * 16384 * d / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        torch.bmm(x, x.transpose(1, 2))
        small.append(2 * 256 * k * k * d / (time.perf_counter() - t) / 1e9)
    return max(big), max(small)


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def baseline_per_dialogue(ctx, resp, k, eps, rows) -> float:
    """Seconds per dialogue of the authors' loop: flat IP query + sklearn DBSCAN, one at a time."""
    import faiss
    from sklearn.cluster import DBSCAN

    index = faiss.IndexFlatIP(ctx.shape[1])
    index.add(ctx)
    t = time.perf_counter()
    for i in rows:
        _, idx = index.search(ctx[i : i + 1], k)
        DBSCAN(eps=eps, min_samples=1).fit(resp[idx[0]])
    return (time.perf_counter() - t) / len(rows)


def slope(ns: list[int], ts: list[float]) -> float:
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0]) if len(ns) > 1 else float("nan")


def run(args: argparse.Namespace) -> None:
    from safealign.isaac.cluster import dbscan_neighbourhoods
    from safealign.isaac.neighbours import recall_at_k, topk_cosine, topk_faiss
    from safealign.isaac.sampler import Neighbourhoods, draw_targets

    sizes = [int(s) for s in args.sizes.split(",")]
    gf_big, gf_bmm = gemm_rates(args.d, args.k)
    print(f"GEMM rate: {gf_big:.1f} GFLOP/s (4096x16384x{args.d}); batched Gram "
          f"{gf_bmm:.1f} GFLOP/s (256 x {args.k}x{args.d}); torch threads {torch.get_num_threads()}")
    rows, stats = [], {"exact": [], "faiss": [], "dbscan": [], "sample": []}
    for n in sizes:
        ctx, resp = synthetic(n, args.d, args.seed)
        (idx, _), t_exact = timed(topk_cosine, ctx, args.k)
        floor_exact = 2 * n * n * args.d / gf_big / 1e9
        (fidx, _), t_faiss = timed(topk_faiss, ctx, args.k, method=args.faiss)
        sub = np.random.default_rng(0).choice(n, min(n, 5000), replace=False)
        recall = recall_at_k(fidx[sub], idx[sub])
        labels, t_db = timed(dbscan_neighbourhoods, resp, idx, args.eps)
        floor_db = 2 * n * args.k**2 * args.d / gf_bmm / 1e9
        nb = Neighbourhoods(idx, np.zeros(idx.shape, np.float32), labels, args.k, args.eps, "x")
        res, t_s = timed(draw_targets, nb, m=3, mode="paper", rng=np.random.default_rng(0))
        loop = baseline_per_dialogue(ctx, resp, args.k, args.eps, sub[: args.loop_rows]) * n
        ours = t_exact + t_db + t_s
        for key, val in zip(stats, (t_exact, t_faiss, t_db, t_s), strict=True):
            stats[key].append(val)
        rows.append((n, t_exact, floor_exact, t_faiss, recall, t_db, floor_db, t_s,
                     float(res.n_clusters.mean()), loop, loop / ours, peak_rss_gb()))
        print(f"  N={n}: done ({ours + t_faiss:.1f} s)", flush=True)
    print("\n| N | exact s | floor s | ratio | faiss-" + args.faiss + " s | recall@K | DBSCAN s |"
          " DBSCAN floor s | sample s | clusters/ctx | faiss+DBSCAN+sample s | loop s (extrap.) |"
          " speed-up | peak RSS GB |")
    print("|" + "---|" * 14)
    for (n, te, fe, tf, rc, td, fd, ts, nc, lp, su, rss) in rows:
        print(f"| {n} | {te:.1f} | {fe:.1f} | {te / fe:.2f} | {tf:.1f} | {rc:.4f} | {td:.1f} | "
              f"{fd:.1f} | {ts:.2f} | {nc:.1f} | {tf + td + ts:.1f} | {lp:.0f} | {su:.0f}x | "
              f"{rss:.2f} |")
    print("\nscaling exponents (log-log slope of time vs N): " + ", ".join(
        f"{k} {slope(sizes, v):.2f}" for k, v in stats.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,40000,160000")
    p.add_argument("--k", type=int, default=150)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--eps", type=float, default=0.22)
    p.add_argument("--faiss", choices=("ivf", "hnsw"), default="ivf")
    p.add_argument("--loop-rows", type=int, default=200, help="dialogues timed for the baseline")
    p.add_argument("--seed", type=int, default=0)
    run(p.parse_args())


if __name__ == "__main__":
    main()
