"""fast_dev_run of each method on model=tiny, plus determinism and the run-dir records."""

from __future__ import annotations

import json

import pytest
import torch

from safealign.fit import build
from safealign.run import train


def _losses(cfg) -> list[float]:
    """First-batch train loss and the initial weights' checksum after build."""
    datamodule, _, module, trainer = build(cfg)
    module.configure_model()
    batch = next(iter(datamodule.train_dataloader()))
    return [float(module.per_example_loss(batch).mean())]


@pytest.mark.parametrize("control", [False, True])
def test_sft_fast_dev_run(make_cfg, control):
    cfg = make_cfg(
        "trainer=debug", "data.source.size=200", "data.source.poison_fraction=0.2",
        f"data.toxic_control={control}",
    )
    train(cfg)
    out = cfg.paths.output_dir
    for name in ("resolved_config.yaml", "git_sha.txt", "command.txt", "metrics.json"):
        assert (torch.os.path.exists(f"{out}/{name}")), name
    assert torch.os.path.exists(f"{out}/model/model.safetensors")
    metrics = json.load(open(f"{out}/metrics.json"))
    assert "train/loss" in metrics and "ppl/unsafe/toxic" in metrics


def test_same_seed_same_loss_different_seed_different(make_cfg, tmp_path):
    a = _losses(make_cfg("data.source.size=200", "seed=0"))
    b = _losses(make_cfg("data.source.size=200", "seed=0"))
    c = _losses(make_cfg("data.source.size=200", "seed=1"))
    assert a == b
    assert a != c


@pytest.mark.parametrize("experiment", ["dpo_builtin", "adpo_builtin"])
def test_preference_experiments_fast_dev_run(make_cfg, experiment):
    cfg = make_cfg(
        f"experiment={experiment}", "trainer=debug", "data.source.size=200", "eval=none",
        "init.data.source.size=200", "+init.trainer.fast_dev_run=true",
    )
    train(cfg)
    metrics = json.load(open(f"{cfg.paths.output_dir}/metrics.json"))
    assert "train/rewards/accuracies" in metrics
    assert ("train/rewards/toxic" in metrics) == (experiment == "adpo_builtin")


def test_wandb_offline_logger_logs_resolved_config_without_secrets(make_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = make_cfg("trainer=debug", "data.source.size=200", "logger=wandb", "+secret_token=hunter2")
    train(cfg)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".txt", ".log")]
    text = "".join(p.read_text(errors="ignore") for p in files)
    assert "hunter2" not in text and "x" * 40 not in text
    assert "max_prompt_length" in text  # the resolved config did reach W&B's files
