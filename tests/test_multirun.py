"""Hydra multiruns: the report command, the pre-launch guard, a 2x2 ADPO grid through submitit's
local executor, and an optuna search logging to offline W&B (one run per job, no secrets)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from safealign.errors import ConfigError, DataError
from safealign.hydra_callbacks import MultirunGuard, WandbFinish, check_parallel_strategy
from safealign.report import collect, main, report

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TRAIN = Path(os.environ.get("SAFEALIGN_TRAIN_PY", ROOT / "train.py"))


def _job(root: Path, name: str, overrides: list[str], metrics: dict | None) -> None:
    (root / name / ".hydra").mkdir(parents=True)
    (root / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (root / name / "metrics.json").write_text(json.dumps(metrics))


def test_report_collects_one_row_per_job(tmp_path: Path):
    fixed = ["experiment=adpo_builtin", "trainer.max_steps=2"]
    for i, (b, g) in enumerate([(0.1, 0.1), (0.1, 0.2), (0.3, 0.1), (0.3, 0.2)]):
        metrics = {"val/loss": 0.5 + b - g, "val/loss_epoch": 9.0, "train/loss": 1.0}
        _job(tmp_path, str(i), [f"method.loss.beta={b}", f"method.loss.gamma={g}", *fixed],
             None if i == 3 else metrics)
    (tmp_path / ".submitit" / "x" / ".hydra").mkdir(parents=True)  # not a job: ignored
    rows = report(tmp_path)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "missing"]
    assert rows[2]["method.loss.beta"] == "0.3" and rows[2]["val/loss"] == pytest.approx(0.7)
    assert "train/loss" not in rows[0] and "val/loss_epoch" not in rows[0]  # default: val/*, test/*
    with open(tmp_path / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and list(table[0])[:4] == ["job", "status", "method.loss.beta", "method.loss.gamma"]
    md = (tmp_path / "report.md").read_text()
    assert "`experiment=adpo_builtin`" in md and md.count("\n| ") == 5  # header + 4 rows
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert main([str(tmp_path), "--metrics", "train/*"]) == 0
    assert "train/loss" in (tmp_path / "report.md").read_text()


def test_report_bad_input(tmp_path: Path):
    with pytest.raises(DataError, match="no Hydra jobs"):
        collect(tmp_path)
    _job(tmp_path, "0", ["a=1"], {"val/loss": 1.0})
    (tmp_path / "0" / "metrics.json").write_text("{not json")
    with pytest.raises(DataError, match="metrics.json"):
        collect(tmp_path)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- just_a_word\n")
    with pytest.raises(DataError, match="not key=value"):
        collect(tmp_path)
    assert main([str(tmp_path / "missing")]) == 2


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_guard_refuses_re_executing_ddp_inside_a_local_multirun():
    with pytest.raises(ConfigError, match="ddp_spawn"):
        check_parallel_strategy(_cfg("strategy=ddp", "trainer.devices=2"))
    with pytest.raises(ConfigError, match="optuna sweeper would even"):
        check_parallel_strategy(_cfg("strategy=ddp", "trainer.devices=2", "hydra/sweeper=optuna"))
    with pytest.raises(ConfigError):
        check_parallel_strategy(_cfg("strategy=ddp", "trainer.devices=2", "launcher=submitit_local"))
    check_parallel_strategy(_cfg("strategy=ddp_spawn", "trainer.devices=2", "hydra/sweeper=optuna"))
    check_parallel_strategy(_cfg("strategy=ddp", "trainer.devices=1"))
    check_parallel_strategy(_cfg("strategy=ddp", "launcher=slurm"))  # SLURM starts the ranks


def test_guard_stops_the_multirun_with_a_clear_error(capsys):
    # a callback's Exception only becomes a warning in Hydra 1.3: the guard must exit instead
    cfg = _cfg("strategy=ddp", "trainer.devices=2", "hydra/sweeper=optuna")
    with pytest.raises(SystemExit) as exc:
        MultirunGuard().on_multirun_start(config=cfg, config_name="train")
    assert exc.value.code == 2 and "error: config key 'trainer.strategy'" in capsys.readouterr().err
    MultirunGuard().on_multirun_start(config=_cfg("strategy=ddp_spawn", "trainer.devices=2"),
                                      config_name="train")


@pytest.mark.parametrize(
    "override",
    ["hydra.launcher.timeout_min=an_hour", "hydra.launcher.gpus_per_node=two",
     "hydra.launcher.partiton=gpu", "hydra.launcher.array_parallelism=[4]"],
)
def test_launcher_option_with_a_wrong_type_or_name_fails_at_composition(override: str):
    # the submitit launcher's dataclass schema types every option: nothing is submitted
    with pytest.raises(Exception, match=override.split("=")[0].split(".")[-1]):
        _cfg("launcher=slurm", override)


def test_slurm_launcher_config():
    cfg = _cfg("launcher=slurm", "hydra.launcher.gpus_per_node=4")
    launcher = cfg.hydra.launcher
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.ckpt_path == "auto"
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0
    plugin = OmegaConf.to_container(cfg.trainer.plugins[0])
    assert plugin == {"_target_": "safealign.resume.slurm_environment", "auto_requeue": True,
                      "requeue_signal": "SIGUSR1"}
    from hydra.utils import instantiate

    env = instantiate(cfg.trainer.plugins[0])
    assert env.auto_requeue and env.requeue_signal.name == "SIGUSR1"


def test_wandb_finish_callback(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(run=object(), finish=lambda: calls.append(1))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    WandbFinish().on_job_end(config=None, job_return=None)
    assert calls == [1]
    fake.run = None
    WandbFinish().on_job_end(config=None, job_return=None)
    assert calls == [1]


# --- slow: real multiruns ---------------------------------------------------------------------

TINY = ["trainer.max_steps=2", "trainer.enable_progress_bar=false", "data.source.size=64"]


def _env(tmp: Path, **extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _run(args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess:
    paths = [f"paths.cache_dir={tmp / 'cache'}", f"paths.artifacts_dir={tmp / 'art'}"]
    return subprocess.run([sys.executable, str(TRAIN), *args, *paths], cwd=ROOT, env=_env(tmp, **env),
                          capture_output=True, text=True, timeout=1800)


def _sweep(name: str) -> str:
    listed = any(OmegaConf.is_dict(d) and "sweep" in d for d in OmegaConf.load(CONF / "train.yaml").defaults)
    return f"sweep={name}" if listed else f"+sweep={name}"


@pytest.mark.slow
def test_adpo_beta_gamma_grid_on_submitit_local_gives_a_four_row_report(tmp_path: Path):
    sweep_dir = tmp_path / "grid"
    res = _run([_sweep("adpo_beta_gamma"), "method.loss.beta=0.1,0.3", "method.loss.gamma=0.1,0.2",
                "launcher=submitit_local", *TINY, "+init.trainer.max_steps=2",
                "init.data.source.size=64", "optimized_metric=val/loss", "eval=none",
                f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl"))  # really went through submitit
    rows = report(sweep_dir)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    pairs = {(r["method.loss.beta"], r["method.loss.gamma"]) for r in rows}
    assert pairs == {("0.1", "0.1"), ("0.1", "0.2"), ("0.3", "0.1"), ("0.3", "0.2")}
    assert all(r["val/loss"] > 0 for r in rows)
    for r in rows:  # each job trained ADPO with its own (beta, gamma)
        resolved = yaml.safe_load((sweep_dir / r["job"] / "resolved_config.yaml").read_text())
        assert (str(resolved["method"]["loss"]["beta"]), str(resolved["method"]["loss"]["gamma"])) == (
            r["method.loss.beta"], r["method.loss.gamma"])
    assert (sweep_dir / "report.png").exists()


@pytest.mark.slow
def test_optuna_search_with_offline_wandb_one_run_per_job_and_no_secret(tmp_path: Path):
    secret = "SECRETKEY0123456789abcdef0123456789abcdef"
    sweep_dir = tmp_path / "optuna"
    res = _run(["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                "hydra.sweeper.direction=minimize", "method.optimizer.lr=interval(0.001,0.01)",
                "optimized_metric=eval/safety_objective", "eval=builtin", "eval.max_prompts=8",
                "eval.sampling.max_new_tokens=8", "eval.scorers.coherence=null",  # issue 11 item 1
                "logger=wandb", *TINY, f"hydra.sweep.dir={sweep_dir}"],
               tmp_path, WANDB_MODE="offline", WANDB_API_KEY=secret)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    metrics = [json.loads((sweep_dir / j / "metrics.json").read_text()) for j in ("0", "1")]
    objective = [m["eval/safety_objective"] for m in metrics]  # the safety objective (A.6)
    assert all(m["eval/safety_objective_lo"] <= o <= m["eval/safety_objective_hi"]
               for m, o in zip(metrics, objective, strict=True))
    assert best["best_value"] == pytest.approx(min(objective))  # train() returned it
    run_dirs = [sorted((sweep_dir / j / "wandb").glob("offline-run-*")) for j in ("0", "1")]
    assert [len(r) for r in run_dirs] == [1, 1] and run_dirs[0][0].name != run_dirs[1][0].name
    for path in sweep_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert len(report(sweep_dir, ("train/*",))) == 2


@pytest.mark.slow
def test_unknown_sweep_key_fails_before_any_job_is_submitted(tmp_path: Path):
    sweep_dir = tmp_path / "bad"
    res = _run(["-m", "experiment=adpo_builtin", "method.loss.gammma=0.1,0.2",
                "launcher=submitit_local", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]  # the guard's exit, not a failed job
    assert "error: config key 'hydra.sweeper.params'" in res.stderr and "gammma" in res.stderr
    assert not sweep_dir.exists()  # stopped before the sweeper wrote or submitted anything
