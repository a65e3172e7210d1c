"""The cross-model evaluation table: markdown, CSV, JSON, a bar chart, and logger (W&B) tables.

Rows are flat dicts ``{"model": name, <metric>: float | int | None, ...}``; None means "not
available" (no scorer LM, no references, no prompt labels) and prints as "–". A metric with a 95%
interval carries ``<metric>_lo`` and ``<metric>_hi`` (:mod:`safealign.eval.rows`): separate
columns in CSV/JSON and logger scalars, one ``value [lo, hi]`` cell in markdown.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from safealign.io import atomic_open, atomic_path, write_json
from safealign.tables import markdown_table

log = logging.getLogger("safealign.eval")

COLUMNS = (
    "model",
    "toxicity_rate",
    "toxicity_probability",
    "expected_max_toxicity",
    "safety_score",
    "evasiveness_rate",
    "over_refusal_rate",
    "unsafe_refusal_rate",
    "coherence",
    "dist_1",
    "dist_2",
    "entropy_4",
    "avg_length",
    "f_ppl",
    "b_ppl",
    "f_nll",
    "b_nll",
    "bleu_4",
    "n_prompts",
    "n_samples",
    "samples_per_prompt",
    "n_empty",
    "empty_rate",
    "n_unknown",
    "n_truncated",
)
# Bounded metrics that share one [0, 1]-ish axis; entropy, length and PPL have their own scales.
BAR_COLUMNS = (
    "toxicity_rate",
    "toxicity_probability",
    "expected_max_toxicity",
    "safety_score",
    "evasiveness_rate",
    "over_refusal_rate",
    "coherence",
    "dist_2",
    "bleu_4",
)
BOUNDS = ("_lo", "_hi")


def _has_interval(table: list[dict], c: str) -> bool:
    return any(f"{c}{b}" in row for row in table for b in BOUNDS)


def columns(table: list[dict]) -> list[str]:
    """The known columns in order, then any extra keys the rows carry; each metric's ``_lo`` and
    ``_hi`` columns right after it."""
    keys = [*COLUMNS, *(k for row in table for k in row if k not in COLUMNS)]
    metrics = [k for k in dict.fromkeys(keys) if not k.endswith(BOUNDS) or k[:-3] not in keys]
    return [x for c in metrics for x in
            (c, *(f"{c}{b}" for b in BOUNDS if _has_interval(table, c)))]  # fmt: skip


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _cell(row: dict, c: str) -> str:
    """``value [lo, hi]`` for a metric with an interval, else the value."""
    lo, hi = row.get(f"{c}_lo"), row.get(f"{c}_hi")
    if row.get(c) is None or lo is None or hi is None:
        return _fmt(row.get(c))
    return f"{_fmt(row[c])} [{_fmt(lo)}, {_fmt(hi)}]"


def to_markdown(table: list[dict], notes: list[str] | None = None) -> str:
    """A markdown table, ``value [lo, hi]`` where there is a 95% interval; columns that are None
    for every model are listed in a note instead."""
    cols = [c for c in columns(table) if not (c.endswith(BOUNDS) and _has_interval(table, c[:-3]))]
    shown = [c for c in cols if any(row.get(c) is not None for row in table)]
    lines = markdown_table(shown, ([_cell(row, c) for c in shown] for row in table))
    hidden = [c for c in cols if c not in shown]
    notes = [*(notes or []), *([f"not available: {', '.join(hidden)}"] if hidden else [])]
    return "\n".join([lines, ""] + [f"- {n}" for n in notes]) + "\n"


def write_csv(path: Path, table: list[dict]) -> None:
    cols = columns(table)
    with atomic_open(path) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(cols)
        writer.writerows(
            [["" if row.get(c) is None else row.get(c) for c in cols] for row in table]
        )


def plot_bars(path: Path, table: list[dict]) -> None:
    """Grouped bars: one group per main metric, one bar per model, 95% intervals as error bars
    (metrics missing for all models are left out). Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless; never opens a window
    import matplotlib.pyplot as plt

    cols = [c for c in BAR_COLUMNS if any(row.get(c) is not None for row in table)]
    width = 0.8 / max(len(table), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(cols)), 4.0))
    for j, row in enumerate(table):
        values = [row.get(c) if row.get(c) is not None else math.nan for c in cols]
        xs = [i + (j - (len(table) - 1) / 2) * width for i in range(len(cols))]
        bounds = [[row.get(f"{c}{b}") for c in cols] for b in BOUNDS]  # 95% interval: error bars
        yerr = [[abs(v - b) if b is not None else 0.0 for v, b in zip(values, bs, strict=True)]
                for bs in bounds]  # fmt: skip
        ax.bar(xs, values, width=width, label=str(row["model"]), yerr=yerr, capsize=2)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_ylabel("value")
    ax.set_title("evaluation (higher safety_score, coherence, dist_2 are better)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run_notes(scorers: dict, scorer_lm, sampling, threshold: float) -> list[str]:
    """What produced the numbers: scorers, sampling, the empty-generation policy, F/B-PPL."""

    def name(key: str) -> str | None:
        s = scorers.get(key)
        return None if s is None else getattr(s, "name", type(s).__name__)

    notes = [
        f"toxicity scorer: {name('toxicity')} (unsafe = score >= {threshold}; nan scores "
        f"re-scored by {name('toxicity_fallback') or 'profanity'}, counted in n_unknown)",
        f"evasiveness scorer: {name('evasiveness')}; coherence scorer: {name('coherence')}",
        f"sampling: temperatures {list(sampling.temperatures)}, {sampling.n_samples} sample(s) "
        f"per prompt and temperature, max_new_tokens {sampling.max_new_tokens}",
        "empty generations are excluded from every per-response metric (see n_empty)",
    ]
    if scorer_lm is None:
        notes.append("F-PPL/B-PPL skipped: set scorer_lm=PATH (one fixed local causal LM)")
    else:
        notes.append(f"F-PPL/B-PPL: exp(mean token NLL) under scorer LM {scorer_lm}")
    return notes


def interval_notes(table: list[dict], n_boot: int, seed: int) -> list[str]:
    """What the intervals and the prompt-level metrics mean, with n (samples per prompt) stated."""
    ns = sorted({str(r["samples_per_prompt"]) for r in table if r.get("samples_per_prompt")})
    n = "/".join(ns) or "?"
    return [
        f"toxicity_rate = per-sample toxic rate; toxicity_probability = share of prompts with >= 1 "
        f"toxic sample among n={n} samples per prompt; expected_max_toxicity = mean over prompts "
        f"of the max over n={n} samples per prompt (RealToxicityPrompts uses 25)",
        "[lo, hi] = 95% interval: rates Wilson (per-sample rates with the prompt-clustered "
        "effective sample size), means and expected max toxicity percentile bootstrap over "
        f"prompts (B={n_boot}, seed {seed}); docs/methods.md A.5",
    ]


def write_outputs(out_dir: Path, table: list[dict], notes: list[str], stem: str = "table") -> None:
    """<stem>.md, <stem>.csv, <stem>.json ({"columns", "rows", "notes"}) and bars.png, atomically."""
    out_dir = Path(out_dir)
    with atomic_open(out_dir / f"{stem}.md") as f:
        f.write(to_markdown(table, notes))
    write_csv(out_dir / f"{stem}.csv", table)
    write_json(out_dir / f"{stem}.json", {"columns": columns(table), "rows": table, "notes": notes})
    plot_bars(out_dir / "bars.png", table)


def log_to_loggers(logger_cfg, table: list[dict], config: dict) -> None:
    """Send the table to the configured Lightning loggers (``logger`` group; none -> nothing).

    Every logger gets one scalar per model and numeric key (``eval/<model>/<metric>``, interval
    ends ``<metric>_lo``/``_hi`` included: the W&B run summary); a logger with ``log_table`` (W&B)
    also gets ``eval/table`` as a ``wandb.Table``. ``config`` must already be redacted
    (:func:`safealign.utils.resolved_config`): it is logged as the run's hyperparameters.
    """
    if not logger_cfg:
        return
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    nodes = (
        logger_cfg
        if OmegaConf.is_list(logger_cfg) or isinstance(logger_cfg, list)
        else [logger_cfg]
    )
    cols = columns(table)
    for lg in (instantiate(node) for node in nodes):
        lg.log_hyperparams(config)
        if hasattr(lg, "log_table"):
            lg.log_table(
                key="eval/table", columns=cols, data=[[r.get(c) for c in cols] for r in table]
            )
        for row in table:
            scalars = {f"eval/{row['model']}/{k}": v for k, v in row.items()
                       if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
            lg.log_metrics(scalars, step=0)
        lg.finalize("success")
        finish = getattr(getattr(lg, "experiment", None), "finish", None)
        if callable(finish) and hasattr(lg, "log_table"):
            finish()  # end the W&B run now, not at interpreter exit
        log.info("logged the evaluation table to %s", type(lg).__name__)
