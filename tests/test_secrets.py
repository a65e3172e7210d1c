"""Secrets passed as overrides never reach a file the run writes (issue 14, item 7): not
command.txt, not Hydra's .hydra/*.yaml, not the sweep's multirun.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from safealign.utils import (
    REDACTED,
    is_secret_key,
    redact,
    redact_overrides,
    redact_yaml_file,
)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hunter2"
FAST = [*TINY, "trainer=debug", "data.source.size=200"]


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "wandb_api_key",
        "apiKey",
        "APIKEY",
        "secret_token",
        "hf_token",
        "password",
        "logger.wandb.api_key",
        "+secret_token",
        "secrets.hf",
    ],
)
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "tokenizer",
        "model.tokenizer.vocab_size",
        "max_new_tokens",
        "add_special_tokens",
        "num_key_value_heads",
        "method.loss.beta",
    ],
)
def test_ordinary_keys_are_kept(key):
    assert not is_secret_key(key)  # a redacted tokenizer config would be silently wrong


def test_resolved_config_keeps_tokenizer_and_drops_secrets():
    out = redact({"model": {"tokenizer": {"vocab_size": 300}}, "wandb": {"api_key": "k"}})
    assert out == {"model": {"tokenizer": {"vocab_size": 300}}, "wandb": {"api_key": REDACTED}}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("+secret_token=hunter2", "+secret_token=<redacted>"),
        ("++logger.wandb.api_key=ab,cd", "++logger.wandb.api_key=<redacted>"),
        ("a=1,+secret_token=hunter2,b=[1,2]", "a=1,+secret_token=<redacted>,b=[1,2]"),
        ("method.loss.beta=0.1", "method.loss.beta=0.1"),
        ("/usr/bin/python", "/usr/bin/python"),
    ],
)
def test_redact_overrides(text, expected):
    assert redact_overrides(text) == expected


def test_redact_yaml_file_rewrites_only_when_needed(tmp_path):
    hydra_yaml = tmp_path / "hydra.yaml"
    hydra_yaml.write_text(
        "hydra:\n  overrides:\n    task:\n    - +secret_token=hunter2\n    - seed=1\n"
        "  job:\n    override_dirname: +secret_token=hunter2,seed=1\n"
        "secret_token: hunter2\nlr: ${x}\n"
    )
    assert redact_yaml_file(hydra_yaml)
    data = yaml.safe_load(hydra_yaml.read_text())
    assert data["hydra"]["overrides"]["task"] == ["+secret_token=<redacted>", "seed=1"]
    assert data["hydra"]["job"]["override_dirname"] == "+secret_token=<redacted>,seed=1"
    assert data["secret_token"] == REDACTED and data["lr"] == "${x}"  # interpolations kept
    assert not redact_yaml_file(hydra_yaml)  # already clean: not rewritten


def _run(
    tmp_path: Path, *args: str, flags: tuple[str, ...] = (), fast: list[str] = FAST, **env: str
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **env}
    cmd = [sys.executable, "train.py", *flags, f"paths.cache_dir={tmp_path}/cache", *fast, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _files_with_secret(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_secret_override_is_in_no_file_of_the_run(tmp_path):
    run = tmp_path / "run"
    r = _run(
        tmp_path,
        f"hydra.run.dir={run}",
        f"+secret_token={SECRET}",
        f"+logger.wandb.api_key={SECRET}x",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / ".hydra" / "overrides.yaml").exists() and (run / "command.txt").exists()
    assert _files_with_secret(tmp_path) == []
    assert "+secret_token=<redacted>" in (run / "command.txt").read_text()
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert config["secret_token"] == REDACTED and config["model"]["tokenizer"]["vocab_size"] == 300


@pytest.mark.slow
def test_secret_override_is_in_no_file_of_a_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    r = _run(
        tmp_path, f"hydra.sweep.dir={sweep}", f"+secret_token={SECRET}", "seed=0,1", flags=("-m",)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert REDACTED in (sweep / "multirun.yaml").read_text() and (sweep / "1" / ".hydra").is_dir()
    assert _files_with_secret(tmp_path) == []


@pytest.mark.slow
def test_secret_override_is_not_in_the_offline_wandb_run(tmp_path):
    # fast_dev_run would swap W&B for a dummy logger: train two real steps instead
    steps = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    fast = [*TINY, "data.source.size=200", "logger=wandb", *steps]
    r = _run(
        tmp_path,
        f"hydra.run.dir={tmp_path}/run",
        f"+secret_token={SECRET}",
        fast=fast,
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert _files_with_secret(tmp_path) == []
