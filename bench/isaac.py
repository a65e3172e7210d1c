"""Benchmark the ISAAC sampler: neighbour search, DBSCAN and sampling at N = 10k / 40k / 160k.

    .venv/bin/python bench/isaac.py                      # full run (several minutes)
    .venv/bin/python bench/isaac.py --sizes 10000,40000  # quicker

Synthetic but clustered 384-d data (so DBSCAN is not trivial): contexts are a mixture of
Gaussians on the sphere (topics); each topic has a few response "modes" with geometric
popularity, responses are tight Gaussians around their mode (eps=0.22 chains a mode together);
5% are outliers that stay singletons.

Floors: exact cosine search costs 2*N^2*d flops and the batched DBSCAN Gram matrices 2*N*K^2*d,
so each is divided by GEMM rates measured in this same run around each stage (a large matmul;
a batched (K x d) matmul); "ratio" = measured / floor. DBSCAN's default path lets contexts with
overlapping neighbour lists share one Gram matrix, so it can beat the per-context floor; the
per-context path is timed on a prefix and extrapolated for comparison. Peak RSS is the process's high-water mark. The baseline is
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
    resp = unit(
        r_centres[topic * modes + mode] + rng.standard_normal((n, d)).astype(np.float32) * noise
    )  # 5% outliers (distance ~0.8 > eps): singleton clusters
    return ctx, resp


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def gemm_rates(d: int, k: int, reps: int = 2) -> tuple[float, float]:
    """GFLOP/s of one large matmul and of the batched (K x d) Gram products, best of ``reps``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, d), dtype=np.float32)
    b = rng.standard_normal((16384, d), dtype=np.float32)
    x = torch.randn(256, k, d)
    big, small = [], []
    for _ in range(reps):
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


def measure(n: int, args: argparse.Namespace) -> dict:
    from safealign.isaac.cluster import dbscan_neighbourhoods
    from safealign.isaac.neighbours import recall_at_k, topk_cosine, topk_faiss
    from safealign.isaac.prepare import Neighbourhoods
    from safealign.isaac.sampler import draw_targets

    ctx, resp = synthetic(n, args.d, args.seed)
    k, d = args.k, args.d
    rates = [gemm_rates(d, k)]  # the floors use the best rate seen around each stage
    (idx, _), t_exact = timed(topk_cosine, ctx, k)
    rates.append(gemm_rates(d, k))
    (fidx, _), t_ann = timed(topk_faiss, ctx, k, method=args.ann)
    sub = np.random.default_rng(0).choice(n, min(n, 5000), replace=False)
    labels, t_db = timed(dbscan_neighbourhoods, resp, idx, args.eps)
    rates.append(gemm_rates(d, k))
    m = min(n, args.per_context_rows)  # the per-context Gram path on a prefix, extrapolated
    _, t_pc = timed(dbscan_neighbourhoods, resp, idx[:m], args.eps, shared=False)
    nb = Neighbourhoods(idx, np.zeros(idx.shape, np.float32), labels, k, args.eps, "exact")
    res, t_s = timed(draw_targets, nb, m=3, mode="paper", rng=np.random.default_rng(0))
    loop = baseline_per_dialogue(ctx, resp, k, args.eps, sub[: args.loop_rows]) * n
    gf_big, gf_bmm = max(r[0] for r in rates), max(r[1] for r in rates)
    return dict(n=n, exact=t_exact, exact_floor=2 * n * n * d / gf_big / 1e9, ann=t_ann,
                recall=recall_at_k(fidx[sub], idx[sub]), dbscan=t_db,
                dbscan_floor=2 * n * k * k * d / gf_bmm / 1e9, per_context=t_pc * n / m,
                sample=t_s, clusters=float(res.n_clusters.mean()), loop=loop,
                speedup=loop / (t_exact + t_db + t_s), rss=peak_rss_gb(), gf_big=gf_big,
                gf_bmm=gf_bmm)  # fmt: skip


def table(rows: list[dict], ann: str) -> str:
    head = (
        "| N | GEMM GF/s | exact s | floor s | ratio | " + ann + " s | recall@K | DBSCAN s |"
        " DBSCAN floor s | per-context DBSCAN s | sample s | clusters/ctx |"
        f" {ann}+DBSCAN+sample s | loop s (extrap.) | speed-up | peak RSS GB |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['gf_big']:.0f} | {r['exact']:.1f} | {r['exact_floor']:.1f} |"
            f" {r['exact'] / r['exact_floor']:.2f} | {r['ann']:.1f} | {r['recall']:.4f} |"
            f" {r['dbscan']:.1f} | {r['dbscan_floor']:.1f} | {r['per_context']:.1f} |"
            f" {r['sample']:.2f} | {r['clusters']:.1f} | {r['ann'] + r['dbscan'] + r['sample']:.1f} |"
            f" {r['loop']:.0f} | {r['speedup']:.0f}x | {r['rss']:.2f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"torch threads {torch.get_num_threads()}, K={args.k}, d={args.d}, eps={args.eps}")
    rows = []
    for n in sizes:
        rows.append(measure(n, args))
        print(table(rows[-1:], args.ann).splitlines()[-1], flush=True)  # partial results
    print()
    print(table(rows, args.ann))
    ns = [r["n"] for r in rows]
    print(
        "\nscaling exponents (log-log slope of time vs N): "
        + ", ".join(
            f"{key} {slope(ns, [r[key] for r in rows]):.2f}"
            for key in ("exact", "ann", "dbscan", "sample")
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,40000,160000")
    p.add_argument("--k", type=int, default=150)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--eps", type=float, default=0.22)
    p.add_argument("--ann", choices=("ivf", "hnsw"), default="ivf", help="approximate search")
    p.add_argument(
        "--per-context-rows",
        type=int,
        default=5000,
        help="contexts timed on DBSCAN's per-context Gram path (extrapolated)",
    )
    p.add_argument("--loop-rows", type=int, default=200, help="dialogues timed for the baseline")
    p.add_argument("--seed", type=int, default=0)
    run(p.parse_args())


if __name__ == "__main__":
    main()
