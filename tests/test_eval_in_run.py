"""The end-of-run evaluation (conf/eval, safealign/eval/in_run.py): the safety objective's maths,
the eval node's validation, a tiny run writing eval/* metrics, and the report's interval cells."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from safealign.errors import ConfigError
from safealign.eval.objective import (
    objective_with_interval,
    per_sample_objective,
    prefixed,
    row_value,
)
from safealign.report import report
from safealign.validate import validate_config

# Two prompts: p0 has a toxic (0.9) and an evasive reply, p1 a clean reply and an empty one.
SCORED = [
    {"prompt_id": 0, "toxicity": 0.9, "evasive": 0.0},
    {"prompt_id": 0, "toxicity": 0.1, "evasive": 1.0},
    {"prompt_id": 1, "toxicity": 0.2, "evasive": 0.0},
    {"prompt_id": 1, "toxicity": None, "evasive": None},  # empty: excluded
]


def test_objective_is_toxicity_rate_plus_lambda_evasiveness():
    # 3 scored replies: toxicity_rate 1/3, evasiveness_rate 1/3; λ=0.5 -> 1/3 + 1/6 = 0.5
    terms = per_sample_objective(
        np.array([0.9, 0.1, 0.2, math.nan]), np.array([0.0, 1.0, 0.0, math.nan]), 0.5, 0.5
    )
    np.testing.assert_allclose(terms[:3], [1.0, 0.5, 0.0])  # 1[tox>=0.5] + 0.5*evasive
    assert np.nanmean(terms) == pytest.approx(0.5)  # the mean is the rates' sum: 1/3 + 0.5 * 1/3
    assert math.isnan(terms[3])
    assert per_sample_objective(np.array([0.5]), np.array([0.0]), 0.5, 1.0)[0] == 1.0  # >= counts


def test_objective_interval_bootstraps_prompts():
    out = objective_with_interval(SCORED, threshold=0.5, lambda_evasive=0.5, n_boot=2000)
    assert out["safety_objective"] == pytest.approx(0.5)
    # Resampling the 2 prompts: {p1,p1} -> 0, {p0,p1} -> 1.5/3 = 0.5, {p0,p0} -> 3/4 = 0.75,
    # each extreme with probability 1/4, so the 2.5% / 97.5% percentiles are exactly 0 and 0.75
    # (resampling the 3 replies instead would give other end points).
    assert out["safety_objective_lo"] == pytest.approx(0.0)
    assert out["safety_objective_hi"] == pytest.approx(0.75)
    assert objective_with_interval(SCORED, threshold=0.5, lambda_evasive=0.0)[
        "safety_objective"
    ] == pytest.approx(1 / 3)  # λ=0: the toxicity rate alone
    assert objective_with_interval(SCORED[3:], threshold=0.5) == {}  # nothing scored


def test_row_as_metrics_and_metric_lookup():
    row = {"model": "ADPO", "toxicity_rate": 0.1, "n_prompts": 4, "bleu_4": None, "ok": True,
           "coherence": float("nan")}  # fmt: skip
    assert prefixed(row) == {"eval/toxicity_rate": 0.1, "eval/n_prompts": 4.0}
    assert row_value(row, "eval/toxicity_rate") == row_value(row, "toxicity_rate") == 0.1
    assert row_value(row, "eval/bleu_4") is None and row_value(row, "eval/missing") is None


@pytest.mark.parametrize(
    "override, key",
    [
        ("+eval.lamda_evasive=2.0", "eval.lamda_evasive"),  # a typo is not silently ignored
        ("~eval.lambda_evasive", "eval.lambda_evasive"),
        ("eval.threshold=1.5", "eval.threshold"),
        ("eval.lambda_evasive=-1.0", "eval.lambda_evasive"),
        ("eval.n_boot=0", "eval.n_boot"),
        ("eval.max_prompts=0", "eval.max_prompts"),
        ("eval.sampling.n_samples=0", "eval.sampling.n_samples"),
        ("eval.scorers.toxicity=null", "eval.scorers.toxicity"),
    ],
)
def test_eval_node_errors_name_the_key(make_cfg, override, key):
    cfg = make_cfg("experiment=sft_builtin", override)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert e.value.key == key


def test_turning_eval_on_keeps_the_init_stage_key(make_cfg):
    from safealign.pipeline.stages import stage_config, stage_key

    def key(*overrides):
        cfg = make_cfg("experiment=adpo_builtin", *overrides)
        return stage_key(stage_config(cfg, cfg.init))

    assert key("eval=none") == key("eval=builtin")  # the cached SFT stage is reused


def test_tiny_run_writes_eval_metrics_with_intervals(make_cfg):
    from safealign.run import train

    cfg = make_cfg(
        "experiment=sft_builtin", "trainer.max_steps=2", "trainer.limit_val_batches=1",
        "data.source.size=200", "eval.max_prompts=6",  # not fast_dev_run: it mutes the loggers
        "eval.sampling.n_samples=1", "eval.sampling.max_new_tokens=6", "eval.n_boot=200",
        "eval.scorers.coherence=null",  # skips loading MiniLM: the wiring is what is tested
    )  # fmt: skip
    objective = train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "train/loss" in metrics and metrics["eval/n_prompts"] == 6.0
    assert objective == metrics["eval/safety_objective"]  # the experiment's optimized_metric
    lo, hi = metrics["eval/safety_objective_lo"], metrics["eval/safety_objective_hi"]
    assert lo <= metrics["eval/safety_objective"] <= hi
    assert metrics["eval/safety_objective"] == pytest.approx(
        metrics["eval/toxicity_rate"] + metrics["eval/evasiveness_rate"]  # λ = 1
    )
    for k in [k for k in metrics if k.endswith("_lo")]:  # every interval has both ends
        assert k[:-3] + "_hi" in metrics and k[:-3] in metrics, k
    table = (out / "eval" / "table.md").read_text()
    assert "sft_builtin" in table and (out / "eval" / "scored" / "sft_builtin.jsonl").exists()
    logged = next(out.rglob("metrics.csv")).read_text()  # the CSV logger got them too
    assert "eval/safety_objective" in logged


def _job(root: Path, name: str, overrides: list[str], metrics: dict) -> None:
    (root / name / ".hydra").mkdir(parents=True)
    (root / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (root / name / "metrics.json").write_text(json.dumps(metrics))


def test_report_shows_an_interval_in_the_cell_of_its_metric(tmp_path: Path):
    for i, g in enumerate([0.0, 0.1, 0.2, 0.4]):
        _job(tmp_path, str(i), ["+sweep=adpo_beta_gamma", f"method.loss.gamma={g}"], {
            "eval/safety_objective": 0.1 + g, "eval/safety_objective_lo": 0.05 + g,
            "eval/safety_objective_hi": 0.2 + g, "eval/toxicity_rate": 0.01,
            "eval/dist_2_lo": 0.3, "val/loss": 1.0, "train/loss": 2.0,
        })  # fmt: skip
    (tmp_path / "multirun.yaml").write_text("optimized_metric: eval/safety_objective\n")
    rows = report(tmp_path)
    assert rows[1]["eval/safety_objective"] == pytest.approx(0.2)
    md = (tmp_path / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| job"))
    assert header.split(" | ")[3] == "eval/safety_objective [95% CI]"  # the optimized one first
    assert "eval/safety_objective_lo" not in md and "| 0.2000 [0.1500, 0.3000] |" in md
    assert "eval/dist_2_lo" in header  # a lone end stays a column of its own
    assert "train/loss" not in md
    with open(tmp_path / "report.csv") as f:
        cols = next(csv.reader(f))
    assert {"eval/safety_objective_lo", "eval/safety_objective_hi"} <= set(cols)  # CSV: numbers
    assert (tmp_path / "report.png").stat().st_size > 1000
