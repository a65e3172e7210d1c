"""`make demo`: the ADPO pipeline over several seeds and the paper's headline comparison in
miniature, SFT vs DPO vs ADPO on toxicity, evasiveness and coherence, mean ± sd over seeds.

The targets (ADPO toxicity below SFT's and not above DPO's, evasiveness not above DPO's) are
checked on the means and reported as met or NOT met, never forced (issue 4).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from safealign.eval.metrics import mean_sd
from safealign.io import atomic_open, write_json

log = logging.getLogger("safealign.pipeline")
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
_META = ("_target_", "_partial_", "_recursive_", "seeds")


@dataclass
class DemoResult:
    results: list = field(default_factory=list)  # one PipelineResult per seed
    summary: dict = field(default_factory=dict)  # model -> metric -> [mean, sd, n]
    seconds: float = 0.0
    objective: float | None = None


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
    head = "| model | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for model, stats in summary.items():
        lines.append(f"| {model} | " + " | ".join(_cell(stats[m]) for m in cols.values()) + " |")
    what = f"mean ± sd over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    return "\n".join(lines) + f"\n\n({what}; toxicity/evasiveness = rate of sampled responses)\n"


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


KL_KEYS = ("train/kl/chosen_step", "train/kl/rejected_step")


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
    """DPO vs ADPO kl/chosen and kl/rejected (METHODS.md A.4), averaged over seeds."""
    from safealign.methods.plots import plot_kl

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
    return plot_kl(histories, out_dir / "kl.png", KL_KEYS) if histories else None


def write_summary(out_dir: Path, results: list, seconds: float | None = None) -> dict:
    """results.md / results.json / stages.json / kl.png in ``out_dir``; prints the table."""
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
    print(
        "\n" + text + f"outputs: {out_dir}" + (f" (KL curves: {plot})" if plot else ""), flush=True
    )
    return summary


def pipeline_settings(cfg: DictConfig) -> dict:
    """``cfg.pipeline`` resolved (under cfg's own seed) as keyword arguments of the runner."""
    node = OmegaConf.to_container(cfg.pipeline, resolve=True)
    return {
        k: OmegaConf.create(v) if isinstance(v, dict) else v
        for k, v in node.items()
        if k not in _META
    }


def run_demo(cfg: DictConfig, seeds: list[int], **_: object) -> DemoResult:
    """The whole ADPO pipeline once per seed (outputs in ``<run dir>/seed<N>``), then one table.

    The other ``pipeline.*`` keys are re-resolved per seed (``${seed}`` interpolations follow)."""
    from safealign.pipeline.adpo import run_adpo_pipeline

    t0 = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    results = []
    for seed in seeds:
        c = copy.deepcopy(cfg)
        with open_dict(c):
            c.seed, c.paths.output_dir = int(seed), str(out_dir / f"seed{seed}")
        print(f"\n=== seed {seed} ===", flush=True)
        results.append(run_adpo_pipeline(c, **pipeline_settings(c)))
    if cfg.get("isaac_demo"):  # issue 5: the ISAAC row (its own cached stages)
        from safealign.pipeline.isaac_demo import run_isaac_demo

        run_isaac_demo(cfg)
    seconds = time.perf_counter() - t0
    summary = write_summary(out_dir, results, seconds)
    return DemoResult(results, summary, seconds)
