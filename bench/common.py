"""Benchmark plumbing: step clocks, peak RSS, one subprocess per row, markdown tables.

Each benchmark row runs in its OWN process (the script re-invokes itself with ``--row NAME``), so
the peak RSS of one configuration never includes another's allocations or imports. The child
prints exactly one line ``BENCH_ROW {json}`` on stdout; everything else it prints is ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROW_MARKER = "BENCH_ROW "
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def child_env(threads: int) -> dict[str, str]:
    """Environment for a row process: fixed thread count, offline, no progress bars or W&B."""
    env = dict(os.environ)
    env.update({v: str(threads) for v in _THREAD_VARS})
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        PYTHONWARNINGS="ignore",
    )
    return env


def peak_rss_mb() -> float:
    """High-water resident set size of THIS process (Linux reports ru_maxrss in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def current_rss_mb() -> float:
    """Resident set size now, from /proc (0.0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class StepClock:
    """Wall-clock marks at the END of every optimizer step, with the work done in that step.

    Step k's time is mark[k] - mark[k-1]: data loading, forward, backward, optimizer and every
    hook in between are all inside it, for every framework alike. The first ``warmup`` steps are
    left out, so the timed window starts at the end of the last warm-up step.
    """

    marks: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds (all threads)
    rss: list[float] = field(default_factory=list)  # resident MB right after each step
    tokens: list[int] = field(default_factory=list)
    pairs: list[int] = field(default_factory=list)

    def mark(self, tokens: int, pairs: int) -> None:
        self.marks.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.rss.append(current_rss_mb())
        self.tokens.append(int(tokens))
        self.pairs.append(int(pairs))

    def summary(self, warmup: int) -> dict[str, float]:
        if warmup < 1 or len(self.marks) <= warmup:
            raise ValueError(
                f"need warmup >= 1 and more than {warmup} steps, got {len(self.marks)}"
            )
        seconds = self.marks[-1] - self.marks[warmup - 1]
        steps = [
            b - a for a, b in zip(self.marks[warmup - 1 : -1], self.marks[warmup:], strict=True)
        ]
        pairs, tokens = sum(self.pairs[warmup:]), sum(self.tokens[warmup:])
        cpu = self.cpu[-1] - self.cpu[warmup - 1]
        return {
            "timed_steps": len(steps),
            "seconds": seconds,
            "pairs": pairs,
            "tokens": tokens,
            "pairs_per_s": pairs / seconds,
            "tokens_per_s": tokens / seconds,
            "step_ms_mean": 1000 * seconds / len(steps),
            "step_ms_median": 1000 * sorted(steps)[len(steps) // 2],
            "step_ms_min": 1000 * min(steps),
            # CPU time is less disturbed than wall time by other processes on the machine
            "cpu_ms_per_step": 1000 * cpu / len(steps),
            "pairs_per_cpu_s": pairs / cpu,
            "rss_after_steps_mb": max(self.rss),
        }


def emit_row(result: dict) -> None:
    """Child side: hand the row's result to the parent (one marked JSON line on stdout)."""
    print(ROW_MARKER + json.dumps(result), flush=True)


def run_row(script: Path, row: str, extra: list[str], threads: int, timeout: float) -> dict:
    """Parent side: run ``script --row row *extra`` in a fresh interpreter; its result dict."""
    cmd = [sys.executable, str(script), "--row", row, *extra]
    proc = subprocess.run(
        cmd, env=child_env(threads), capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(ROW_MARKER)]
    if proc.returncode != 0 or len(lines) != 1:
        tail = "\n".join(proc.stderr.splitlines()[-30:])
        raise RuntimeError(f"row {row!r} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[0][len(ROW_MARKER) :])


def best_runs(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per row, the run with the highest throughput (the least disturbed by other processes on
    the machine), with the WORST peak RSS over all its runs (memory is not a lucky draw)."""
    return {
        name: {
            **max(rs, key=lambda r: r["pairs_per_s"]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        }
        for name, rs in runs.items()
    }


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` option per dataclass field (default None = keep the dataclass's)."""
    for f in dataclasses.fields(cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)


def dataclass_from_args(args: argparse.Namespace, cls: type, base: dict):
    """``cls`` from ``base`` values overridden by every option given on the command line."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{**base, **{k: v for k, v in given.items() if v is not None}})


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def wait_for_quiet(max_load: float | None, max_wait: float, poll: float = 10.0) -> float | None:
    """Sleep until the 1-minute load average is below ``max_load`` (at most ``max_wait`` s).

    Other processes on a small machine distort wall-clock rows far more than anything measured
    here; waiting for a quiet moment is cheaper than many repeats. Returns the load at the start.
    """
    deadline = time.monotonic() + max_wait
    while max_load is not None and time.monotonic() < deadline:
        load = load_average()
        if load is None or load[0] < max_load:
            break
        time.sleep(poll)
    load = load_average()
    return load[0] if load else None


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
