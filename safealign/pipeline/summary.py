"""The ADPO pipeline's summary (one run or several seeds) and the demos' tables: SFT vs DPO vs
ADPO on toxicity, evasiveness and coherence (mean ± sd over seeds), the issue-4 targets, the KL
curves (docs/methods.md A.4) and the ISAAC row; written to the run dir and logged as the results.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from safealign.eval.metrics import mean_sd
from safealign.io import atomic_open, write_json
from safealign.methods.plots import KL_KEYS, plot_kl
from safealign.tables import markdown_table

log = logging.getLogger(__name__)
ORDER = ("SFT", "DPO", "ADPO")
HEADLINE = {
    "toxicity": "toxicity_rate",
    "evasiveness": "evasiveness_rate",
    "coherence": "coherence",
}
EXTRA = {
    "max toxicity": "expected_max_toxicity",
    "dist-2": "dist_2",
    "length": "avg_length",
    "empty": "empty_rate",
}
ISAAC_COLUMNS = ("safety_score", "toxicity_rate", "evasiveness_rate", "coherence")


def aggregate(tables: list[list[dict]]) -> dict[str, dict[str, list[float]]]:
    """model -> metric -> [mean, sd (ddof=1), n seeds] over the finite values of each seed."""
    out: dict[str, dict[str, list[float]]] = {}
    for model in ORDER:
        rows = [r for t in tables for r in t if r["model"] == model]
        if not rows:
            continue
        out[model] = {}
        for metric in (*HEADLINE.values(), *EXTRA.values()):
            vals = [r[metric] for r in rows if r.get(metric) is not None]
            vals = [v for v in vals if math.isfinite(v)]
            mean, sd = mean_sd(vals)
            out[model][metric] = [mean, sd, len(vals)]
    return out


def _cell(stat: list[float]) -> str:
    mean, sd, n = stat
    if not n:
        return "–"
    return f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {sd:.3f}"


def to_markdown(summary: dict, n_seeds: int) -> str:
    cols = {**HEADLINE, **EXTRA}
    rows = [[model, *(_cell(stats[m]) for m in cols.values())] for model, stats in summary.items()]
    what = f"mean ± sd over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    table = markdown_table(["model", *cols], rows)
    return table + f"\n\n({what}; toxicity/evasiveness = rate of sampled responses)\n"


def write_isaac_summary(out_dir: Path, rows: list[dict], statuses: dict, seed: int) -> None:
    """The demo's ISAAC row, plain SFT vs ISAAC (docs/methods.md B.7 safety score): logged, and
    isaac_results.json in ``out_dir``."""
    body = [[r["model"], *(f"{r[c]:.3f}" for c in ISAAC_COLUMNS)] for r in rows]
    table = markdown_table(["model", *ISAAC_COLUMNS], body)
    log.info("\nISAAC vs SFT on the built-in test split (seed %s):\n%s\n", seed, table)
    write_json(out_dir / "isaac_results.json", {"rows": rows, "statuses": statuses})


def check_targets(summary: dict) -> list[str]:
    """The issue-4 targets on the means: each line says met or NOT met, with the numbers."""
    if not all(m in summary for m in ORDER):
        return []
    tox = {m: summary[m]["toxicity_rate"][0] for m in ORDER}
    eva = {m: summary[m]["evasiveness_rate"][0] for m in ORDER}
    checks = [
        ("ADPO toxicity < SFT toxicity", tox["ADPO"] < tox["SFT"], tox["ADPO"], tox["SFT"]),
        ("ADPO toxicity <= DPO toxicity", tox["ADPO"] <= tox["DPO"], tox["ADPO"], tox["DPO"]),
        ("ADPO evasiveness <= DPO evasiveness", eva["ADPO"] <= eva["DPO"], eva["ADPO"], eva["DPO"]),
    ]
    return [
        f"{'met    ' if ok else 'NOT met'}  {name}  ({a:.3f} vs {b:.3f})"
        for name, ok, a, b in checks
    ]


def mean_history(histories: list[list[dict]], keys=KL_KEYS) -> list[dict]:
    """Per-step mean of ``keys`` over runs (seeds); a step missing in a run is averaged without it."""
    by_step: dict[float, dict[str, list[float]]] = {}
    for hist in histories:
        for row in hist:
            slot = by_step.setdefault(row["step"], {})
            for k in keys:
                if k in row:
                    slot.setdefault(k, []).append(row[k])
    return [
        {"step": s} | {k: sum(v) / len(v) for k, v in by_step[s].items()} for s in sorted(by_step)
    ]


def _kl_plot(out_dir: Path, results: list) -> Path | None:
    """DPO vs ADPO kl/* curves (docs/methods.md A.4), averaged over seeds."""
    histories: dict[str, list[dict]] = {}
    for stage in ("dpo", "adpo"):
        runs = []
        for res in results:
            d = res.dirs.get(stage)
            if d is not None and (d / "history.jsonl").is_file():
                text = (d / "history.jsonl").read_text(encoding="utf-8")
                runs.append([json.loads(x) for x in text.splitlines()])
        if runs:
            label = stage.upper() + (f" (mean of {len(runs)} seeds)" if len(runs) > 1 else "")
            histories[label] = mean_history(runs)
    return plot_kl(histories, out_dir / "kl.png") if histories else None


def write_summary(out_dir: Path, results: list, seconds: float | None = None) -> dict:
    """results.md / results.json / stages.json / kl.png in ``out_dir``; logs the table."""
    summary = aggregate([r.table for r in results])
    text = to_markdown(summary, len(results)) if summary else "(no evaluation stage run)\n"
    targets = check_targets(summary)
    text += "".join(f"\n- {t}" for t in targets) + ("\n" if targets else "")
    if seconds is not None:
        text += f"\nwall time: {seconds:.0f} s\n"
    with atomic_open(out_dir / "results.md") as f:
        f.write(text)
    write_json(
        out_dir / "results.json",
        {"summary": summary, "targets": targets, "tables": [r.table for r in results]},
    )
    write_json(
        out_dir / "stages.json",
        [{"statuses": r.statuses, "seconds": r.seconds, "dirs": r.dirs} for r in results],
    )
    plot = _kl_plot(out_dir, results)
    log.info("\n%soutputs: %s%s", text, out_dir, f" (KL curves: {plot})" if plot else "")
    return summary
