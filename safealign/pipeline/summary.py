"""The ADPO pipeline's summary (one run or several seeds) and the demos' tables: SFT vs DPO vs
ADPO on toxicity, evasiveness and coherence with 95% intervals, the paired ADPO − SFT and
ADPO − DPO differences, the targets (issues 4 and 11), the KL curves (docs/methods.md A.4) and the
ISAAC row; written to the run dir and logged as the results.

Pooling over seeds (docs/methods.md A.5): every evaluate stage keeps its per-sample scores, and
the samples of all seeds are reduced together by :func:`safealign.eval.rows.reduce_scored` with
one group per (seed, prompt): rates are Wilson intervals on the pooled counts (effective sample
size clustered by group), means bootstrap over groups. A difference row resamples the groups
jointly for both models (paired bootstrap): every model of one seed is sampled on the same test
prompts with the same seed. The per-seed rows stay in results.json (``tables``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safealign.errors import DataError
from safealign.eval.rows import reduce_scored, sample_flags
from safealign.eval.stats import paired_bootstrap_interval
from safealign.io import atomic_open, write_json
from safealign.methods.plots import KL_KEYS, plot_kl
from safealign.pipeline.adpo_stages import EVAL_SETTINGS
from safealign.tables import markdown_table

log = logging.getLogger(__name__)
ORDER = ("SFT", "DPO", "ADPO")
HEADLINE = {
    "toxicity": "toxicity_rate",
    "evasiveness": "evasiveness_rate",
    "coherence": "coherence",
}
EXTRA = {
    "tox. probability": "toxicity_probability",
    "max toxicity": "expected_max_toxicity",
    "dist-2": "dist_2",
    "length": "avg_length",
    "empty": "empty_rate",
}
DIFFS = (("ADPO", "SFT"), ("ADPO", "DPO"))  # paired difference rows: a − b
DIFF_METRICS = ("toxicity_rate", "evasiveness_rate")
ISAAC_COLUMNS = ("safety_score", "toxicity_rate", "evasiveness_rate", "coherence")
Samples = dict[str, tuple[list[dict], list[tuple[int, int]]]]  # model -> (samples, groups)


def load_samples(results: list) -> tuple[Samples, dict]:
    """model -> (scored samples of every run, their (run, prompt) groups), and the evaluation
    settings (threshold, n_boot, seed) of the first run. ``results``: PipelineResults."""
    samples: Samples = {}
    settings: dict = {}
    for run, res in enumerate(results):
        for name in ORDER:
            d = res.dirs.get(f"evaluate/{name}")
            if d is None:
                continue
            path = Path(d) / EVAL_SETTINGS
            if not path.is_file():
                raise DataError(path, "missing: the evaluate stage predates pooled intervals")
            s = json.loads(path.read_text(encoding="utf-8"))
            text = (Path(d) / s["scored"]).read_text(encoding="utf-8")
            rows = [json.loads(line) for line in text.splitlines()]
            slot = samples.setdefault(name, ([], []))
            slot[0].extend(rows)
            slot[1].extend((run, r["prompt_id"]) for r in rows)
            settings = settings or s
    return samples, settings


def pooled(samples: Samples, settings: dict) -> dict[str, dict]:
    """model -> one flat row over the samples of every seed (intervals: the module docstring)."""
    kw = {k: settings[k] for k in ("threshold", "n_boot", "seed")}
    return {m: reduce_scored(rows, groups, **kw) for m, (rows, groups) in samples.items()}


def differences(samples: Samples, summary: dict, settings: dict) -> dict[str, dict]:
    """``"A − B"`` -> pooled rate of A minus B and its 95% paired-bootstrap interval, for
    :data:`DIFF_METRICS` (A and B sampled on the same (seed, prompt) groups)."""
    out: dict[str, dict] = {}
    for a, b in DIFFS:
        if a not in samples or b not in samples:
            continue
        flags = {m: sample_flags(samples[m][0], settings["threshold"]) for m in (a, b)}
        row: dict = {}
        for metric in DIFF_METRICS:
            va, vb = summary[a][metric], summary[b][metric]
            try:
                ci = paired_bootstrap_interval(
                    flags[a][metric], samples[a][1], flags[b][metric], samples[b][1],
                    n_boot=settings["n_boot"], seed=settings["seed"],
                )  # fmt: skip
            except ValueError as e:  # not the same prompts: report, never pair wrongly
                log.warning("%s − %s %s: %s", a, b, metric, e)
                ci = None
            lo, hi = ci if ci is not None else (None, None)
            diff = None if va is None or vb is None else va - vb
            row |= {metric: diff, f"{metric}_lo": lo, f"{metric}_hi": hi}
        out[f"{a} − {b}"] = row
    return out


def _cell(row: dict, metric: str) -> str:
    v, lo, hi = (row.get(f"{metric}{x}") for x in ("", "_lo", "_hi"))
    if v is None:
        return "–"
    return f"{v:.3f}" if lo is None or hi is None else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def to_markdown(summary: dict, diffs: dict, n_seeds: int, n_boot: int) -> str:
    """The pooled table (models, then difference rows) and a note stating seeds, prompts and n."""
    cols = {**HEADLINE, **EXTRA}
    rows = [[m, *(_cell(r, c) for c in cols.values())] for m, r in (summary | diffs).items()]
    first = next(iter(summary.values()), {})
    n, groups = first.get("samples_per_prompt"), first.get("n_prompts")
    note = (
        f"pooled over {n_seeds} seed(s): {groups} (seed, prompt) groups x n={n} samples per prompt;"
        " [lo, hi] = 95% interval: rates Wilson on the pooled counts (effective sample size "
        f"clustered by (seed, prompt)), means bootstrap over (seed, prompt) groups (B={n_boot}); "
        "ADPO − X rows: paired bootstrap over the same groups. toxicity = per-sample toxic rate; "
        f"tox. probability = share of prompts with >= 1 toxic of n={n} samples; max toxicity = "
        f"expected max over n={n} samples per prompt (RealToxicityPrompts uses 25)"
    )
    return markdown_table(["model", *cols], rows) + f"\n\n({note})\n"


def write_isaac_summary(out_dir: Path, rows: list[dict], statuses: dict, seed: int) -> None:
    """The demo's ISAAC row, plain SFT vs ISAAC (docs/methods.md B.7 safety score): logged, and
    isaac_results.json in ``out_dir``."""
    body = [[r["model"], *(_cell(r, c) for c in ISAAC_COLUMNS)] for r in rows]  # 95% intervals
    table = markdown_table(["model", *ISAAC_COLUMNS], body)
    log.info("\nISAAC vs SFT on the built-in test split (seed %s):\n%s\n", seed, table)
    write_json(out_dir / "isaac_results.json", {"rows": rows, "statuses": statuses})


def _below(a: float | None, b: float | None, strict: bool = True) -> bool:
    return a is not None and b is not None and (a < b if strict else a <= b)


def check_targets(summary: dict, diffs: dict) -> list[str]:
    """The targets, each line met or NOT met with its numbers; never forced (issues 4 and 11)."""
    if not all(m in summary for m in ORDER):
        return []
    sft, dpo, adpo = (summary[m] for m in ORDER)
    vs_sft, vs_dpo = diffs.get("ADPO − SFT", {}), diffs.get("ADPO − DPO", {})
    t, e = "toxicity_rate", "evasiveness_rate"
    checks = [
        ("ADPO toxicity below SFT with non-overlapping 95% intervals",
         _below(adpo.get(f"{t}_hi"), sft.get(f"{t}_lo")),
         f"ADPO {_cell(adpo, t)} vs SFT {_cell(sft, t)}"),
        ("ADPO − SFT toxicity: paired 95% interval excludes 0 (below it)",
         _below(vs_sft.get(f"{t}_hi"), 0.0), _cell(vs_sft, t)),
        ("ADPO toxicity <= DPO toxicity", _below(adpo[t], dpo[t], strict=False),
         f"ADPO − DPO {_cell(vs_dpo, t)}"),
        ("ADPO evasiveness <= DPO evasiveness", _below(adpo[e], dpo[e], strict=False),
         f"ADPO − DPO {_cell(vs_dpo, e)}"),
    ]  # fmt: skip
    return [f"{'met    ' if ok else 'NOT met'}  {name}  ({nums})" for name, ok, nums in checks]


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
    """results.md / results.json / stages.json / kl.png in ``out_dir``; logs the table.

    Returns:
        model -> its row pooled over the seeds (with ``_lo``/``_hi`` 95% intervals).
    """
    evaluated = [r for r in results if r.table]
    samples, settings = load_samples(evaluated)
    summary = pooled(samples, settings) if samples else {}
    diffs = differences(samples, summary, settings) if samples else {}
    text = "(no evaluation stage run)\n"
    if summary:
        text = to_markdown(summary, diffs, len(evaluated), settings["n_boot"])
    targets = check_targets(summary, diffs)
    text += "".join(f"\n- {t}" for t in targets) + ("\n" if targets else "")
    if seconds is not None:
        text += f"\nwall time: {seconds:.0f} s\n"
    with atomic_open(out_dir / "results.md") as f:
        f.write(text)
    write_json(
        out_dir / "results.json",
        {"summary": summary, "differences": diffs, "targets": targets,
         "n_seeds": len(evaluated), "tables": [r.table for r in results]},
    )  # fmt: skip
    write_json(
        out_dir / "stages.json",
        [{"statuses": r.statuses, "seconds": r.seconds, "dirs": r.dirs} for r in results],
    )
    plot = _kl_plot(out_dir, results)
    log.info("\n%soutputs: %s%s", text, out_dir, f" (KL curves: {plot})" if plot else "")
    return summary
