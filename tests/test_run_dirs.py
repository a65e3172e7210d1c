"""Run dirs (issue 14, item 5): concurrent launches never share one; a re-run into a dir keeps the
earlier CSV log."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR, TINY
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import safealign.cli as cli
from safealign.run import train

ROOT = Path(__file__).resolve().parents[1]
STAMP = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d{3}_"  # + [job id _] 4 hex digits


def _hydra_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_run_stamp_differs_within_one_millisecond(monkeypatch):
    class Frozen(cli.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 29, 10, 40, 27, 123456)

    monkeypatch.setattr(cli, "datetime", Frozen)
    stamps = {cli.run_stamp() for _ in range(50)}
    assert len(stamps) > 40  # 4 random hex digits: 65,536 values
    assert all(re.fullmatch(r"2026-11-29_10-40-27\.123_[0-9a-f]{4}", s) for s in stamps)
    assert re.fullmatch(r"2026-11-29_10-40-27\.123_8812_[0-9a-f]{4}", cli.run_stamp("8812"))


def test_default_dirs_resolve_once_per_config_with_the_slurm_job_id(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = _hydra_cfg()
    run_dir, sweep_dir = cfg.hydra.run.dir, cfg.hydra.sweep.dir
    assert re.fullmatch(rf"outputs/train/{STAMP}[0-9a-f]{{4}}", run_dir)
    assert cfg.hydra.run.dir == run_dir  # cached: every later read gives the same dir
    assert sweep_dir == "multirun/train/" + run_dir.split("/")[-1]
    assert _hydra_cfg().hydra.run.dir != run_dir  # a second launch gets its own
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    assert re.fullmatch(rf"outputs/train/{STAMP}777_[0-9a-f]{{4}}", _hydra_cfg().hydra.run.dir)


def test_explicit_and_wandb_agent_run_dirs_are_kept(monkeypatch):
    assert _hydra_cfg("hydra.run.dir=/x/run").hydra.run.dir == "/x/run"  # ckpt_path=auto re-runs
    monkeypatch.setenv("WANDB_SWEEP_ID", "s1")
    monkeypatch.setenv("WANDB_RUN_ID", "r1")
    assert _hydra_cfg("launcher=wandb_agent").hydra.run.dir == "outputs/sweeps/s1/r1"


def test_sweep_jobs_share_the_launchers_sweep_dir():
    """Hydra re-composes each job's config and copies the master's resolver cache into it
    (load_sweep_config): the stamp must come from that cache, not be drawn again."""
    master = _hydra_cfg()
    sweep_dir = master.hydra.sweep.dir
    job = _hydra_cfg("seed=1")
    OmegaConf.copy_cache(from_config=master, to_config=job)
    assert job.hydra.sweep.dir == sweep_dir


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("SLURM_JOB_ID", None)
    return env


@pytest.mark.slow
def test_two_launches_at_the_same_moment_get_their_own_dirs(tmp_path):
    """Default run dir, relative to the launch cwd (tmp_path): both start together, both succeed."""
    args = [sys.executable, str(ROOT / "train.py"), *TINY, "trainer.max_steps=2",
            "trainer.limit_val_batches=1", "data.source.size=64", "data.batch_size=8",
            f"paths.cache_dir={tmp_path / 'cache'}", f"paths.artifacts_dir={tmp_path / 'art'}"]  # fmt: skip
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    procs = [subprocess.Popen(args, cwd=tmp_path, env=_env(), **pipe) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    run_dirs = sorted((tmp_path / "outputs" / "train").iterdir())
    assert len(run_dirs) == 2, run_dirs
    for d in run_dirs:
        assert re.fullmatch(rf"{STAMP}[0-9a-f]{{4}}", d.name)
        assert (d / "metrics.json").exists()
        assert len(list(d.glob("csv/*/metrics.csv"))) == 1


def _csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_rerun_into_the_same_dir_keeps_the_earlier_csv_log(make_cfg):
    common = ["data.source.size=64", "data.batch_size=8", "trainer.log_every_n_steps=1"]
    first = make_cfg(*common, "trainer.max_steps=2", "ckpt_path=auto")
    train(first)
    run = Path(first.paths.output_dir)
    assert (run / "checkpoints" / "last.ckpt").exists()
    [log0] = run.glob("csv/*/metrics.csv")
    before = log0.read_text()
    assert _csv_rows(log0)

    second = make_cfg(*common, "trainer.max_steps=4", "ckpt_path=auto")  # same tmp_path/run
    train(second)
    logs = sorted(run.glob("csv/*/metrics.csv"))
    assert len(logs) == 2 and log0 in logs
    assert log0.read_text() == before  # the first run's history is untouched
    [log1] = [p for p in logs if p != log0]
    steps = [int(r["step"]) for r in _csv_rows(log1) if r.get("step")]
    assert steps and min(steps) >= 1  # the re-run resumed; it did not start again at step 0


@pytest.mark.slow
def test_submitit_sweep_jobs_run_in_the_default_sweep_dir(tmp_path):
    """The stamp is drawn once, in the launching process: the pickled jobs (and a requeue)
    re-compose their config in a new process and must still land in that same sweep dir."""
    args = [sys.executable, str(ROOT / "train.py"), "launcher=submitit_local", "seed=0,1", *TINY,
            "trainer=debug", "data.source.size=64", f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.artifacts_dir={tmp_path / 'art'}"]  # fmt: skip
    res = subprocess.run(
        args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    [sweep_dir] = (tmp_path / "multirun" / "train").iterdir()
    assert re.fullmatch(rf"{STAMP}[0-9a-f]{{4}}", sweep_dir.name)
    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl"))
    for job in ("0", "1"):
        assert (sweep_dir / job / "metrics.json").exists(), job
