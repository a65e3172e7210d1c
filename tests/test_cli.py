"""Bad input through the real entry point: one clear message, exit code 2, before any model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path}/run",
           f"paths.cache_dir={tmp_path}/cache", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_missing_required_value(tmp_path):
    r = run_train(tmp_path, "data=hh_rlhf")
    assert r.returncode == 2, r.stderr
    assert "data.source.path" in r.stderr and "???" in r.stderr


def test_unknown_config_option(tmp_path):
    r = run_train(tmp_path, "method=nonsense")
    assert r.returncode != 0
    assert "nonsense" in r.stderr


def test_path_that_does_not_exist(tmp_path):
    r = run_train(tmp_path, "data=jsonl", f"data.source.path={tmp_path}/nope.jsonl")
    assert r.returncode == 2, r.stderr
    assert "nope.jsonl" in r.stderr and "not exist" in r.stderr
    assert not (tmp_path / "run" / "model").exists()  # nothing was built


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', ":2"),
        ('{"prompt": "a", "chosen": "b"}\n', "rejected"),
    ],
)
def test_malformed_jsonl(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    r = run_train(tmp_path, "data=jsonl", f"data.source.path={path}", "method=dpo")
    assert r.returncode == 2, r.stderr
    assert "bad.jsonl" in r.stderr and expected in r.stderr
    assert "Traceback" not in r.stderr
