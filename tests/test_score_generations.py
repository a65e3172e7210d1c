"""Scoring existing generations (`evaluate.py generations=FILE`) and the 95% intervals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from safealign.errors import DataError
from safealign.eval.score_file import read_generations, score_file, score_rows
from safealign.eval.stats import clustered_wilson_interval, wilson_interval

ROOT = Path(__file__).resolve().parents[1]


class WordScorer:
    """1.0 when the response contains ``word``, else 0.0 (cheap, offline, exact)."""

    def __init__(self, word: str, name: str) -> None:
        self.word, self.name = word, name

    def score(self, responses: list[str], contexts: list[str] | None = None) -> np.ndarray:
        return np.array([float(self.word in r) for r in responses])


class LengthScorer:
    name = "chars"

    def score(self, responses: list[str], contexts: list[str] | None = None) -> np.ndarray:
        return np.array([len(r) / 10 for r in responses])


def fake_scorers() -> dict:
    return {"toxicity": WordScorer("idiot", "bad-word"), "evasiveness": WordScorer("sorry", "sorry"),
            "coherence": LengthScorer()}  # fmt: skip


ROWS = [
    {"context": "hi", "response": "you idiot", "model": "a"},
    {"context": "hi", "response": "hello friend", "model": "a"},
    {"context": "how?", "response": "sorry, I cannot", "model": "a"},
    {"context": "how?", "response": "", "model": "a"},  # empty: counted, not scored
    {"context": "hi", "response": "hello", "model": "b"},
    {"context": "how?", "response": "like this", "model": "b"},
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_score_rows_counts_empty_and_intervals():
    a = [r for r in ROWS if r["model"] == "a"]
    row = score_rows(a, fake_scorers(), n_boot=200, seed=0)
    assert (row["n_samples"], row["n_empty"], row["n_unknown"]) == (4, 1, 0)
    assert (row["n_prompts"], row["samples_per_prompt"]) == (2, 2)  # contexts "hi" and "how?"
    assert row["toxicity_rate"] == pytest.approx(1 / 3)
    # 1 toxic of 3 scored, grouped by context: "hi" 1 of 2, "how?" 0 of 1 ->
    # deff = ((1 − 2/3)² + (0 − 1/3)²) / (3·(1/3)·(2/3)) = 1/3 clipped to 1 -> plain Wilson
    lo_hi = (row["toxicity_rate_lo"], row["toxicity_rate_hi"])
    assert lo_hi == pytest.approx(wilson_interval(1, 3))
    assert lo_hi == pytest.approx(clustered_wilson_interval([1, 0, 0], ["hi", "hi", "how?"]))
    assert row["toxicity_probability"] == 0.5  # "hi" has a toxic sample, "how?" has none
    assert row["evasiveness_rate"] == pytest.approx(1 / 3)
    assert row["empty_rate"] == 0.25
    assert row["avg_length"] == pytest.approx((2 + 2 + 3) / 3)
    assert row["coherence_lo"] <= row["coherence"] <= row["coherence_hi"]


def test_bad_rows_name_file_and_line(tmp_path):
    path = write_rows(tmp_path / "gens.jsonl", ROWS[:2] + [{"context": "hi"}])
    with pytest.raises(DataError, match=r"gens\.jsonl:3: missing field 'response'"):
        read_generations(path)
    write_rows(path, [ROWS[0], {"context": 1, "response": "x"}])
    with pytest.raises(DataError, match=r"gens\.jsonl:2: field 'context' must be a string"):
        read_generations(path)
    write_rows(path, [{"context": "c", "response": "r"}])  # no model -> the file stem
    assert list(read_generations(path)) == ["gens"]


def compose(overrides: list[str], tmp_path: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def test_bad_row_fails_before_any_scorer_loads(tmp_path):
    path = write_rows(tmp_path / "gens.jsonl", [ROWS[0], {"context": "c", "response": None}])
    cfg = compose([f"generations={path}", "scorer.toxicity._target_=no.such.Scorer"], tmp_path)
    with pytest.raises(DataError, match=r"gens\.jsonl:2: field 'response' must be a string"):
        score_file(cfg)
    assert not (tmp_path / "run").exists()


def test_cli_scores_a_file_with_two_models(tmp_path):
    path = write_rows(tmp_path / "gens.jsonl", ROWS)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "evaluate.py", f"hydra.run.dir={tmp_path}/run", f"generations={path}",
           "~scorer/coherence", "n_boot=200"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "run" / "results.md").read_text(encoding="utf-8")
    assert "| model | toxicity_rate |" in md and "| a |" in md and "| b |" in md
    assert "| a |" in r.stdout + r.stderr  # the table is logged
    assert "0.0000 [0.0000, 0.6576]" in md  # b: 0/2 unsafe -> Wilson [0, z²/(2+z²)]
    assert "n=1/2 samples per prompt" in md  # b: one response per context, a: two
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert [row["model"] for row in rows] == ["a", "b"] and rows[0]["n_empty"] == 1
    assert rows[1]["toxicity_rate_lo"] == 0.0 and rows[1]["toxicity_rate_hi"] > 0.6
    with open(tmp_path / "run" / "results.csv", encoding="utf-8") as f:
        header = f.readline().strip().split(",")
    assert header[1:4] == ["toxicity_rate", "toxicity_rate_lo", "toxicity_rate_hi"]
    assert not (tmp_path / "run" / "generations").exists()  # nothing was generated
