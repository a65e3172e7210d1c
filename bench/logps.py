"""Log-prob path memory and time: today's fp32 log-softmax vs the chunked one vs TRL (issue 10).

Run: .venv/bin/python bench/logps.py [--repeats 2] [--smoke]

Every row takes the same random bf16 logits (B, T, V) that require grad (as a policy forward
under bf16 autocast would hand over) and runs per-sequence log-probs forward, then backward of
their sum, each row in its own process. Memory is the process's peak resident set size above
its size just before the forward (the logits and labels are already there), reset between
forward and backward (/proc/self/clear_refs), so "fwd extra" is the forward's own peak and
"bwd extra" the backward's, which includes the (B, T, V) gradient every method must return
(2 bytes per logit in bf16). Times are the best of ``--repeats``. Rows:

- today: the implementation before issue 10 (a copy below): fp32 copy of the whole logits, full
  log-softmax, gather.
- safealign: ``safealign.logps.sequence_logps`` (chunked logsumexp, custom backward).
- TRL: ``trl.trainer.utils.selective_log_softmax`` (per-row log-softmax; in bf16 for bf16 input).

Results also go to bench/results/logps.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import current_rss_mb, emit_row, fmt, load_average, markdown_table, peak_rss_mb, run_row

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results" / "logps.json"
IMPLS = ("today", "safealign", "TRL")
BASELINE = "today"


@dataclass(frozen=True)
class Config:
    rows: int = 4  # sequences per forward (e.g. 2 DPO pairs)
    vocabs: str = "32000,128256"  # Llama-2 and Llama-3 vocabularies
    lengths: str = "512,1024"
    prompt_fraction: float = 0.0  # leading positions labelled -100; 0 = worst case for skipping
    repeats: int = 2
    threads: int = 2
    seed: int = 0


SMOKE = {"rows": 2, "vocabs": "500", "lengths": "16", "repeats": 1}


# ---------------------------------------------------------------- implementations (child side)
def today_logps(logits, labels, average: bool = False):
    """``safealign.logps.sequence_logps`` before issue 10, verbatim: the baseline."""
    import torch

    logits = logits[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != -100
    safe_labels = labels.masked_fill(~mask, 0)
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe_labels.unsqueeze(-1))
    token_logps = token_logps.squeeze(-1) * mask
    total = token_logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def trl_logps(logits, labels):
    """TRL's selective_log_softmax with the same shift, mask and sum."""
    from trl.trainer.utils import selective_log_softmax

    labels = labels[:, 1:]
    mask = labels != -100
    token_logps = selective_log_softmax(logits[:, :-1, :], labels.masked_fill(~mask, 0))
    return (token_logps.float() * mask).sum(-1)


def implementation(name: str):
    if name == "today":
        return today_logps
    if name == "TRL":
        import trl.trainer.utils  # noqa: F401  (imported here, not inside the timed call)

        return trl_logps
    from safealign.logps import sequence_logps

    return sequence_logps


def reset_peak() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_mb() -> float:
    """Peak RSS since the last reset (VmHWM), or the lifetime peak where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return peak_rss_mb()


def child(row: str, cfg: Config) -> None:
    import torch

    name, vocab, length = row.split(":")
    vocab, length = int(vocab), int(length)
    torch.set_num_threads(cfg.threads)
    fn = implementation(name)
    gen = torch.Generator().manual_seed(cfg.seed)
    # bf16 straight from randn: no fp32 temporary to inflate the peak before the forward
    logits = torch.randn(cfg.rows, length, vocab, generator=gen, dtype=torch.bfloat16)
    logits.mul_(3).requires_grad_()
    labels = torch.randint(0, vocab, (cfg.rows, length), generator=gen)
    labels[:, : int(cfg.prompt_fraction * length)] = -100
    weights = torch.linspace(0.5, 1.5, cfg.rows)  # a backward that is not all-ones
    warm = torch.randn(2, 8, 64, requires_grad=True)  # first-call costs out of the timed window
    fn(warm, torch.randint(0, 64, (2, 8))).sum().backward()
    result = {"fwd_ms": [], "bwd_ms": [], "cpu_ms": [], "fwd_extra_mb": [], "bwd_extra_mb": []}
    for _ in range(cfg.repeats):
        base = current_rss_mb()
        reset_peak()
        start, cpu = time.perf_counter(), time.process_time()
        logps = fn(logits, labels)
        mid = time.perf_counter()
        result["fwd_extra_mb"].append(hwm_mb() - base)
        reset_peak()
        mid = time.perf_counter() - mid + mid  # the reset is not timed
        (grad,) = torch.autograd.grad((logps * weights).sum(), logits)
        end = time.perf_counter()
        result["cpu_ms"].append(1000 * (time.process_time() - cpu))
        result["bwd_extra_mb"].append(hwm_mb() - base)
        result["fwd_ms"].append(1000 * (mid - start))
        result["bwd_ms"].append(1000 * (end - mid))
        grad_sum = float(grad.float().sum())
        del grad, logps
    with torch.no_grad():
        values = fn(logits.detach(), labels)
    emit_row({
        "impl": name, "vocab": vocab, "length": length, "rows": cfg.rows,
        "logits_mb": logits.numel() * logits.element_size() / 2**20,
        "fwd_ms": min(result["fwd_ms"]), "bwd_ms": min(result["bwd_ms"]),
        "cpu_ms": min(result["cpu_ms"]),
        "fwd_extra_mb": max(result["fwd_extra_mb"]), "bwd_extra_mb": max(result["bwd_extra_mb"]),
        "logps": values.tolist(), "grad_sum": grad_sum, "peak_reset": reset_peak(),
        "torch_threads": torch.get_num_threads(),
    })  # fmt: skip


# ---------------------------------------------------------------- parent side
def shapes(cfg: Config) -> list[tuple[int, int]]:
    return [(int(v), int(t)) for v in cfg.vocabs.split(",") for t in cfg.lengths.split(",")]


def compare(results: list[dict]) -> list[dict]:
    """Ratios of every row against today's row of the same shape, and its |Δ log-prob|."""
    base = {(r["vocab"], r["length"]): r for r in results if r["impl"] == BASELINE}
    out = []
    for r in results:
        b = base[(r["vocab"], r["length"])]
        total, b_total = r["fwd_ms"] + r["bwd_ms"], b["fwd_ms"] + b["bwd_ms"]
        diff = max(abs(x - y) for x, y in zip(r["logps"], b["logps"], strict=True))
        out.append({**r, "total_ms": total, "fwd_mem_x": r["fwd_extra_mb"] / b["fwd_extra_mb"],
                    "bwd_mem_x": r["bwd_extra_mb"] / b["bwd_extra_mb"], "time_x": total / b_total,
                    "fwd_time_x": r["fwd_ms"] / b["fwd_ms"], "max_abs_dlogp": diff})  # fmt: skip
    return out


def table(rows: list[dict]) -> str:
    header = ["V", "T", "impl", "fwd extra MB", "x today", "bwd extra MB", "x today", "fwd ms",
              "x today", "fwd+bwd ms", "x today", "max |dlogp|"]  # fmt: skip
    body = [
        [str(r["vocab"]), str(r["length"]), r["impl"], fmt(r["fwd_extra_mb"], ".0f"),
         fmt(r["fwd_mem_x"], ".2f"), fmt(r["bwd_extra_mb"], ".0f"), fmt(r["bwd_mem_x"], ".2f"),
         fmt(r["fwd_ms"], ".0f"), fmt(r["fwd_time_x"], ".2f"), fmt(r["total_ms"], ".0f"),
         fmt(r["time_x"], ".2f"), fmt(r["max_abs_dlogp"], ".1e")]
        for r in rows
    ]  # fmt: skip
    return markdown_table(header, body)


def aims(rows: list[dict]) -> list[str]:
    """Issue 10's aim at the largest vocabulary: fwd extra <= 0.3x today, time <= 1.1x."""
    top = max(r["vocab"] for r in rows)
    out = []
    for r in rows:
        if r["impl"] != "safealign" or r["vocab"] != top:
            continue
        ok = r["fwd_mem_x"] <= 0.3 and r["time_x"] <= 1.1
        out.append(f"{'MET ' if ok else 'MISS'} V={r['vocab']} T={r['length']}: fwd extra "
                   f"{r['fwd_mem_x']:.2f}x today (aim <= 0.3), fwd+bwd time {r['time_x']:.2f}x "
                   f"(aim <= 1.1)")  # fmt: skip
    return out


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the plumbing")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per row process")
    for f in dataclasses.fields(Config):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    args = p.parse_args(argv)
    if args.config:
        return args, Config(**json.loads(args.config))
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    base = SMOKE if args.smoke else {}
    return args, Config(**{**base, **{k: v for k, v in given.items() if v is not None}})


def main(argv: list[str] | None = None) -> None:
    from safealign.io import write_json

    args, cfg = parse_args(argv)
    if args.row:
        return child(args.row, cfg)
    if BASELINE not in args.impls:
        raise SystemExit(f"--impls must include the baseline {BASELINE!r}")
    extra, results = ["--config", json.dumps(dataclasses.asdict(cfg))], []
    load_before = load_average()
    for vocab, length in shapes(cfg):
        for impl in args.impls:
            r = run_row(HERE, f"{impl}:{vocab}:{length}", extra, cfg.threads, args.timeout)
            results.append(r)
            print(f"{impl} V={vocab} T={length}: fwd {r['fwd_ms']:.0f} ms, +{r['fwd_extra_mb']:.0f}"
                  f" MB; bwd {r['bwd_ms']:.0f} ms, +{r['bwd_extra_mb']:.0f} MB",
                  file=sys.stderr, flush=True)  # fmt: skip
    rows = compare(results)
    print(f"{cfg.rows} rows of bf16 logits requiring grad, {cfg.prompt_fraction:.0%} of positions "
          f"masked, {cfg.threads} threads, best of {cfg.repeats}; 1/5/15-min load "
          f"{load_before} -> {load_average()}. Extra = peak RSS above the process before the "
          "forward (logits already resident); bwd extra includes the bf16 gradient "
          "(= logits MB).\n")  # fmt: skip
    print(table(rows))
    print("\n" + "\n".join(aims(rows)))
    write_json(args.out, {"config": dataclasses.asdict(cfg), "rows": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
