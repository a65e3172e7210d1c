"""Collect a Hydra multirun directory into one table and one plot.

    python -m safealign.report multirun/adpo_builtin/2026-11-23_12-00-00 [--metrics 'val/*']

One row per job (every `<dir>/**/.hydra/overrides.yaml`): the overrides that differ between jobs
(constant ones go to the table's header) and the job's final metrics from `metrics.json`
(default: val/*, test/* and the end-of-run evaluation's eval/*); a job without `metrics.json` is
listed with status `missing` (failed, or still running). Writes `report.csv` (one column per
metric), `report.md` (a metric with `<m>_lo`/`<m>_hi` shown as one cell "value [lo, hi]", its 95%
interval) and `report.png` (the plotted metric against the first numeric swept key, one line per
value of the second swept key, interval bars where there are intervals; default metric: the
sweep's `optimized_metric`, else val/loss) into the multirun directory, atomically.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import logging
import sys
from pathlib import Path

import yaml

from safealign.cli import report_error
from safealign.errors import DataError
from safealign.io import atomic_open, atomic_path
from safealign.tables import markdown_table
from safealign.utils import terminal_handler

log = logging.getLogger(__name__)
DEFAULT_METRICS = ("val/*", "test/*", "eval/*")
INTERVAL = ("_lo", "_hi")  # `<m>_lo`, `<m>_hi`: the 95% interval of metric `<m>`


def find_jobs(root: Path) -> list[Path]:
    """Job directories under `root` (those with `.hydra/overrides.yaml`), in job-number order."""
    jobs = [
        p.parent.parent for p in root.rglob(".hydra/overrides.yaml") if ".submitit" not in p.parts
    ]
    return sorted(
        jobs,
        key=lambda d: [
            (0, int(s), "") if s.isdigit() else (1, 0, s) for s in d.relative_to(root).parts
        ],
    )


def read_overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    with open(path, encoding="utf-8") as f:
        lines = yaml.safe_load(f) or []
    if not isinstance(lines, list):
        raise DataError(path, f"expected a list of overrides, got {type(lines).__name__}")
    out = {}
    for line in lines:
        key, sep, value = str(line).partition("=")
        if not sep:
            raise DataError(path, f"override {line!r} is not key=value")
        out[key] = value
    return out


def read_metrics(job: Path, patterns: tuple[str, ...]) -> dict[str, float] | None:
    path = job / "metrics.json"
    if not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e}", line=e.lineno) from e
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float)
        and any(fnmatch.fnmatchcase(k, p) for p in patterns)
        and not k.endswith(("_step", "_epoch"))
    }


def collect(
    root: str | Path, patterns: tuple[str, ...] = DEFAULT_METRICS
) -> tuple[list[dict], list[str], list[str], dict[str, str]]:
    """(rows, swept keys, metric names, constant overrides) of the multirun under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "not a directory")
    jobs = find_jobs(root)
    if not jobs:
        raise DataError(
            root, "no Hydra jobs here (no */.hydra/overrides.yaml): is this a multirun dir?"
        )
    overrides = [read_overrides(j) for j in jobs]
    keys = sorted({k for o in overrides for k in o})
    swept = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    constant = {k: overrides[0][k] for k in keys if k not in swept and k in overrides[0]}
    rows, names = [], set()
    for job, ov in zip(jobs, overrides, strict=True):
        metrics = read_metrics(job, patterns)
        row = {
            "job": str(job.relative_to(root)),
            "status": "ok" if metrics is not None else "missing",
        }
        row.update({k: ov.get(k, "") for k in swept})
        row.update(metrics or {})
        names |= set(metrics or {})
        rows.append(row)
    return rows, swept, sorted(names), constant


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def interval_columns(columns: list[str]) -> tuple[list[str], set[str]]:
    """(columns without the `_lo`/`_hi` of a metric that is itself a column, metrics that have
    both ends): the markdown table shows each such triple in one cell."""
    ends = {c[: -len(e)]: e for c in columns for e in INTERVAL if c.endswith(e)}
    paired = {m for m in ends if m in columns and all(m + e in columns for e in INTERVAL)}
    return [c for c in columns if not any(c == m + e for m in paired for e in INTERVAL)], paired


def _cell(row: dict, column: str, paired: set[str]) -> str:
    value = row.get(column, "")
    lo, hi = (row.get(column + e) for e in INTERVAL)
    if column in paired and isinstance(lo, float) and isinstance(hi, float):
        if isinstance(value, float) and max(abs(value), abs(lo), abs(hi)) < 10:
            return f"{value:.4f} [{lo:.4f}, {hi:.4f}]"  # rates/means: one precision per cell
        return f"{_fmt(value)} [{_fmt(lo)}, {_fmt(hi)}]"
    return _fmt(value)


def write_table(rows: list[dict], columns: list[str], constant: dict[str, str], out: Path) -> None:
    with atomic_open(out / "report.csv") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Multirun report: {out}", ""]
    if constant:
        lines += ["Fixed overrides: " + " ".join(f"`{k}={v}`" for k, v in constant.items()), ""]
    best = out / "optimization_results.yaml"  # written by the optuna sweeper
    if best.exists():
        res = yaml.safe_load(best.read_text(encoding="utf-8")) or {}
        lines += [f"Best (optuna): {res.get('best_params')} -> {res.get('best_value')}", ""]
    shown, paired = interval_columns(columns)
    header = [f"{c} [95% CI]" if c in paired else c for c in shown]
    lines.append(markdown_table(header, ([_cell(r, c, paired) for c in shown] for r in rows)))
    with atomic_open(out / "report.md") as f:
        f.write("\n".join(lines) + "\n")


def _number(s: str) -> float | None:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def _yerr(rows: list[dict], metric: str) -> list[list[float]] | None:
    """Error bar lengths below and above from `<metric>_lo`/`_hi`, when every row has both."""
    ends = [(r.get(metric + "_lo"), r.get(metric + "_hi")) for r in rows]
    if not all(isinstance(lo, float) and isinstance(hi, float) for lo, hi in ends):
        return None
    ys = [r[metric] for r in rows]  # max(0, .): a percentile interval may miss its own point
    return [[max(0.0, y - lo) for y, (lo, _) in zip(ys, ends, strict=True)],
            [max(0.0, hi - y) for y, (_, hi) in zip(ys, ends, strict=True)]]  # fmt: skip


def plot(rows: list[dict], swept: list[str], metric: str, out: Path) -> Path | None:
    """`metric` against the first numeric swept key, one line per value of the next swept key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and metric in r]
    numeric = [k for k in swept if ok and all(_number(r[k]) is not None for r in ok)]
    if not ok or not numeric:
        return None
    x = numeric[0]
    group = next((k for k in swept if k != x), None)
    fig, ax = plt.subplots(figsize=(6, 4))
    for g in sorted({r.get(group, "") for r in ok} if group else {""}, key=str):
        pts = sorted((r for r in ok if not group or r.get(group) == g), key=lambda r: _number(r[x]))
        ax.errorbar(
            [_number(r[x]) for r in pts],
            [r[metric] for r in pts],
            yerr=_yerr(pts, metric),
            marker="o",
            capsize=3,
            label=f"{group}={g}" if group else None,
        )
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(out.name)
    if group:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "report.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out / "report.png"


def report(
    root: str | Path, patterns: tuple[str, ...] = DEFAULT_METRICS, metric: str | None = None
) -> list[dict]:
    """Write report.csv/.md/.png into `root`; returns the rows."""
    root = Path(root)
    rows, swept, names, constant = collect(root, patterns)
    if metric is not None and metric not in names:
        raise DataError(root, f"metric {metric!r} is in no job's metrics.json; have {names}")
    metric = metric or (_default_metric(root, names) if names else None)
    first = [n for n in names if metric and n in (metric, *(metric + e for e in INTERVAL))]
    write_table(rows, ["job", "status", *swept, *first, *(n for n in names if n not in first)],
                constant, root)  # fmt: skip
    if metric:
        plot(rows, swept, metric, root)
    return rows


def _default_metric(root: Path, names: list[str]) -> str:
    """The sweep's `optimized_metric` (from multirun.yaml) if the jobs logged it, else the first."""
    path = root / "multirun.yaml"
    if path.exists():
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if cfg.get("optimized_metric") in names:
            return cfg["optimized_metric"]
    return "val/loss" if "val/loss" in names else names[0]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, handlers=[terminal_handler()])
    p = argparse.ArgumentParser(
        prog="python -m safealign.report", description=__doc__.split("\n")[0]
    )
    p.add_argument("multirun_dir", type=Path)
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated globs")
    p.add_argument("--plot-metric", default=None, help="metric for report.png (default: first)")
    a = p.parse_args(argv)
    try:
        rows = report(a.multirun_dir, tuple(a.metrics.split(",")), a.plot_metric)
    except DataError as e:
        report_error(e)
        return 2
    log.info("%s", (a.multirun_dir / "report.md").read_text(encoding="utf-8"))
    log.info("%d jobs -> %s/report.csv, report.md, report.png", len(rows), a.multirun_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
