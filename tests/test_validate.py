"""Hyper-parameter validation (issue 14, item 3): nonsense values stop before any data or model,
with one line naming the key, the value and the allowed range."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from safealign.errors import ConfigError
from safealign.validate import RULES, config_errors, validate_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))

# (overrides, key named in the error, text of the allowed range)
BAD = [
    (["method=dpo", "method.loss.beta=0"], "method.loss.beta", "> 0"),
    (["method=dpo", "method.loss.beta=-1"], "method.loss.beta", "> 0"),
    (["method=ipo", "method.loss.beta=0"], "method.loss.beta", "> 0"),
    (["method=hinge", "method.loss.beta=0"], "method.loss.beta", "> 0"),
    (["method=adpo", "method.loss.gamma=-0.1"], "method.loss.gamma", ">= 0"),
    (["method=cdpo", "method.loss.label_smoothing=0.9"], "method.loss.label_smoothing", "[0, 0.5)"),
    (["method.optimizer.lr=nan"], "method.optimizer.lr", "finite"),
    (["method.optimizer.lr=0"], "method.optimizer.lr", "> 0"),
    (["method.optimizer.weight_decay=-0.01"], "method.optimizer.weight_decay", ">= 0"),
    (["+method.optimizer.eps=inf"], "method.optimizer.eps", "finite"),
    (["+method.loss.scale=nan"], "method.loss.scale", "finite"),
    (["seed=abc"], "seed", "integer"),
    (["trainer.max_epochs=0"], "trainer.max_epochs", ">= 1"),
    (["trainer.max_steps=0"], "trainer.max_steps", ">= 1"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs", "never stop"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches", ">= 1"),
    (["trainer.gradient_clip_val=-1.0"], "trainer.gradient_clip_val", "> 0"),
    (["data.batch_size=0"], "data.batch_size", ">= 1"),
    (["data.max_prompt_length=96"], "data.max_prompt_length", "< max_length"),
    (["data.max_length=0"], "data.max_length", ">= 1"),
    (["data.source.poison_fraction=1.5"], "data.source.poison_fraction", "[0, 1]"),
    (["experiment=isaac_builtin", "data.eps=0"], "data.eps", "> 0"),
    (["experiment=isaac_builtin", "data.k=0"], "data.k", ">= 1"),
    (["experiment=isaac_builtin", "data.sampler.tau=0"], "data.sampler.tau", "> 0"),
    (["experiment=isaac_builtin", "data.sampler.m=0"], "data.sampler.m", ">= 1"),
    (["experiment=isaac_builtin", "data.sampler.top_k=0"], "data.sampler.top_k", ">= 1"),
    (["experiment=isaac_builtin", "data.sampler.scale=count"], "data.sampler.scale", "shares"),
    (["data.control_recall=1.5"], "data.control_recall", "[0, 1]"),
    (["experiment=adpo_pipeline", "init.data.control_recall=-0.1"], "init.data.control_recall",
     "[0, 1]"),
    (["experiment=isaac_diasafety", "data.source.unsafe_share=1.0"],
     "data.source.unsafe_share", "[0, 1)"),
    (["experiment=isaac_builtin", "data.sampler.top_p=1.5"], "data.sampler.top_p", "(0, 1]"),
    (["experiment=adpo_pipeline", "init.method.optimizer.lr=-1"], "init.method.optimizer.lr", ">"),
    (["experiment=adpo_pipeline", "init.trainer.max_epochs=0"], "init.trainer.max_epochs", ">="),
    (
        ["experiment=adpo_pipeline", "pipeline.dpo.method.loss.beta=0"],
        "pipeline.dpo.method.loss.beta",
        "> 0",
    ),
    (
        ["experiment=adpo_pipeline", "pipeline.generate.toxic.temperatures=[0.0]"],
        "pipeline.generate.toxic.temperatures.0",
        "> 0",
    ),
    (
        ["experiment=adpo_pipeline", "pipeline.evaluate.sampling.top_p=0"],
        "pipeline.evaluate.sampling.top_p",
        "(0, 1]",
    ),
]


def _ids(case) -> str:
    return " ".join(case[0])


@pytest.mark.parametrize("overrides, key, allowed", BAD, ids=[_ids(c) for c in BAD])
def test_nonsense_value_is_named_with_its_range(make_cfg, overrides, key, allowed):
    cfg = make_cfg(*overrides, tiny=False)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert info.value.key == key
    assert allowed in str(info.value) and "got " in str(info.value)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_validates(make_cfg, experiment):
    assert config_errors(make_cfg(f"experiment={experiment}", tiny=False)) == []


@pytest.mark.parametrize("method", ["sft", "dpo", "cdpo", "ipo", "hinge", "adpo", "isaac"])
def test_every_method_default_validates(make_cfg, method):
    assert config_errors(make_cfg(f"method={method}")) == []


def test_valid_edge_values_pass(make_cfg):
    cfg = make_cfg(
        "method=adpo",
        "method.loss.gamma=0",
        "trainer.max_epochs=-1",
        "trainer.max_steps=10",
        "trainer.gradient_clip_val=null",
        "data.source.poison_fraction=0",
        "data.source.evasive_fraction=1",
    )
    validate_config(cfg)


def test_every_error_is_listed_and_the_first_raised():
    cfg = OmegaConf.create({"method": {"loss": {"beta": 0, "gamma": -1}}, "seed": "x"})
    assert [e.key for e in config_errors(cfg)] == ["method.loss.beta", "method.loss.gamma", "seed"]
    with pytest.raises(ConfigError, match=r"also invalid: method.loss.gamma, seed"):
        validate_config(cfg)


def test_missing_and_unresolvable_values_are_left_to_their_own_checks():
    cfg = OmegaConf.create(
        {"method": {"loss": {"beta": "???"}}, "data": {"seed": "${nowhere.seed}"}}
    )
    assert config_errors(cfg) == []


def test_unknown_keys_and_the_hydra_node_are_ignored():
    cfg = OmegaConf.create({"hydra": {"seed": "x"}, "whatever": {"beta": -5}})
    assert config_errors(cfg) == []


def test_rule_table_covers_the_issue_list():
    keys = {".".join(r.suffix) for r in RULES}
    for k in (
        "loss.beta",
        "loss.gamma",
        "loss.label_smoothing",
        "optimizer.lr",
        "eps",
        "data.k",
        "tau",
        "*_fraction",
        "seed",
        "trainer.max_epochs",
        "top_p",
    ):
        assert k in keys


def test_train_raises_before_any_output(make_cfg, tmp_path):
    from safealign.run import train

    cfg = make_cfg("method=ipo", "method.loss.beta=0")
    with pytest.raises(ConfigError, match="method.loss.beta"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # no record, data or model was built


def run_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [
        sys.executable,
        "train.py",
        f"hydra.run.dir={tmp_path}/run",
        f"paths.cache_dir={tmp_path}/cache",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


CLI = [
    (["method=dpo", "method.loss.beta=0"], "method.loss.beta"),
    (["method=ipo", "method.loss.beta=0"], "method.loss.beta"),
    (["method.optimizer.lr=nan"], "method.optimizer.lr"),
    (["seed=abc"], "'seed'"),
    (["trainer.max_epochs=0"], "trainer.max_epochs"),
    (["method=cdpo", "method.loss.label_smoothing=0.9"], "method.loss.label_smoothing"),
    (["experiment=isaac_builtin", "data.eps=0"], "data.eps"),
]


@pytest.mark.parametrize("overrides, key", CLI, ids=[_ids(c) for c in CLI])
def test_cli_exits_2_with_one_line_and_builds_nothing(tmp_path, overrides, key):
    r = run_train(tmp_path, *overrides)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and key in lines[0] and "allowed:" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    run = tmp_path / "run"
    made = {p.name for p in run.iterdir()} - {".hydra", "train.log"} if run.exists() else set()
    assert made == set()  # no resolved_config, checkpoints, model or metrics
    assert not (tmp_path / "cache").exists()  # no data or tokenizer cache either


def test_sweep_point_out_of_range_is_refused_before_launch():
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict, read_write

    from safealign.hydra_callbacks import check_sweep_composes

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["method=dpo"], return_hydra_config=True)
        with read_write(cfg.hydra), open_dict(cfg.hydra.sweeper):
            cfg.hydra.sweeper.params = {"method.loss.beta": "0.1,0"}
        with pytest.raises(ConfigError, match=r"method.loss.beta.*got 0.*method.loss.beta=0\]"):
            check_sweep_composes(cfg, "train")


def test_evaluate_entry_validates_sampling(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [
        sys.executable,
        "evaluate.py",
        f"hydra.run.dir={tmp_path}/run",
        "generation.temperatures=[1.0,0.0]",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: config key 'generation.temperatures.1': got 0.0" in r.stderr
