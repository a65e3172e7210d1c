"""W&B sweep files (sweeps/) and Hydra grids (conf/sweep/): schema, and every point composes.

W&B sweeps need a server, so they are validated, not run (ENV.md "Offline behaviour"): each file's
schema, and each parameter combination (grid: all; bayes/random: endpoints and seeded draws of
every distribution) as a Hydra override set through `hydra.compose`. An unknown key fails.
"""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict, read_write

from safealign.errors import ConfigError, DataError
from safealign.hydra_callbacks import check_sweep_composes, sweep_axes, sweep_points

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
WANDB_SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
HYDRA_GRIDS = sorted((CONF / "sweep").glob("*.yaml"))


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_sweep", ROOT / "scripts" / "check_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check_sweep = _load_checker()


def sweep_override(name: str) -> str:
    """`sweep=name` when train.yaml lists a `sweep` group default, else `+sweep=name`."""
    defaults = OmegaConf.load(CONF / "train.yaml").defaults
    listed = any(OmegaConf.is_dict(d) and "sweep" in d for d in defaults)
    return f"sweep={name}" if listed else f"+sweep={name}"


def _skip_if_experiment_missing(overrides: list[str]) -> None:
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+") == "experiment" and not (CONF / "experiment" / f"{value}.yaml").exists():
            pytest.skip(f"conf/experiment/{value}.yaml does not exist yet: cannot compose its keys")


def test_sweep_files_exist():
    assert len(WANDB_SWEEPS) >= 4 and len(HYDRA_GRIDS) >= 5


@pytest.mark.parametrize("path", WANDB_SWEEPS, ids=lambda p: p.name)
def test_wandb_sweep_file_is_valid_and_every_point_composes(path: Path):
    spec = yaml.safe_load(path.read_text())
    assert "${args_no_hyphens}" in spec["command"] and "${args}" not in spec["command"]
    _skip_if_experiment_missing(spec["command"])
    n = check_sweep.check_sweep_file(path, CONF)
    # grid: every point W&B will run; bayes/random: at least 3 samples of every parameter
    expected = (int(np.prod([len(p["values"]) for p in spec["parameters"].values()]))
                if spec["method"] == "grid" else None)
    assert n == expected if expected is not None else n >= 2 * len(spec["parameters"])


@pytest.mark.parametrize("path", HYDRA_GRIDS, ids=lambda p: p.name)
def test_hydra_grid_composes_at_every_point(path: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[sweep_override(path.stem)], return_hydra_config=True)
        assert cfg.hydra.mode.name == "MULTIRUN"
        fixed, axes = sweep_axes(cfg)
        assert axes, f"{path.name} sweeps nothing"
        check_sweep_composes(cfg, "train")  # raises ConfigError on the first bad point


def _write(tmp_path: Path, **changes) -> Path:
    spec = yaml.safe_load((ROOT / "sweeps" / "adpo_ratio_grid.yaml").read_text())
    spec.update(changes)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_unknown_parameter_fails_naming_it(tmp_path: Path):
    bad = _write(tmp_path, parameters={"method.loss.gammma": {"values": [0.1, 0.2]}})
    with pytest.raises(DataError, match="gammma"):
        check_sweep.check_sweep_file(bad, CONF)
    assert check_sweep.main([str(bad)]) == 2


def test_bad_value_for_a_group_fails(tmp_path: Path):
    bad = _write(tmp_path, command=["${env}", "${interpreter}", "${program}",
                                    "experiment=no_such_experiment", "${args_no_hyphens}"])
    with pytest.raises(DataError, match="no_such_experiment"):
        check_sweep.check_sweep_file(bad, CONF)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"command": ["${env}", "${interpreter}", "${program}", "${args}"]}, "args_no_hyphens"),
        ({"method": "hyperband"}, "method must be one of"),
        ({"metric": {"name": "val/loss", "goal": "lowest"}}, "goal"),
        ({"program": "no_such_program.py"}, "not a file"),
        ({"parameters": {"method.loss.beta": {"distribution": "uniform", "min": 0.1, "max": 1.0}}},
         "grid parameter"),
    ],
)
def test_schema_errors(tmp_path: Path, change: dict, message: str):
    with pytest.raises(DataError, match=message):
        check_sweep.check_sweep_file(_write(tmp_path, **change), CONF)


def test_missing_key_and_bad_distribution(tmp_path: Path):
    spec = yaml.safe_load((ROOT / "sweeps" / "adpo_bayes.yaml").read_text())
    del spec["metric"]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(DataError, match="metric"):
        check_sweep.check_sweep_file(tmp_path / "a.yaml", CONF)
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="unknown distribution"):
        check_sweep.parameter_values("x", {"distribution": "gaussian"}, rng, tmp_path)
    with pytest.raises(DataError, match="min must be < max"):
        check_sweep.parameter_values("x", {"distribution": "uniform", "min": 1.0, "max": 0.5}, rng, tmp_path)


def test_distribution_samples_stay_in_range():
    rng = np.random.default_rng(0)
    vals = check_sweep.parameter_values("b", {"distribution": "log_uniform_values", "min": 0.03, "max": 1.0}, rng, ROOT)
    assert vals[:2] == [0.03, 1.0] and all(0.03 <= v <= 1.0 for v in vals)
    ints = check_sweep.parameter_values("m", {"min": 1, "max": 5}, rng, ROOT)  # inferred int_uniform
    assert all(isinstance(v, int) and 1 <= v <= 5 for v in ints)
    exps = check_sweep.parameter_values("lr", {"distribution": "log_uniform", "min": -5.0, "max": -1.0}, rng, ROOT)
    assert all(np.exp(-5.0) - 1e-12 <= v <= np.exp(-1.0) + 1e-12 for v in exps)
    q = check_sweep.parameter_values("q", {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25}, rng, ROOT)
    assert all(abs(v / 0.25 - round(v / 0.25)) < 1e-9 for v in q)


def test_sweep_points_product_or_one_axis_at_a_time():
    axes = {"a": ["1", "2"], "b": ["x", "y", "z"]}
    assert len(sweep_points(axes)) == 6
    per_axis = sweep_points(axes, limit=0)  # each value of each key, the others at their first
    assert per_axis == [["a=1", "b=x"], ["a=2", "b=x"], ["a=1", "b=y"], ["a=1", "b=z"]]


def test_hydra_grid_with_unknown_key_is_refused():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[sweep_override("adpo_beta_gamma")], return_hydra_config=True)
        with read_write(cfg.hydra), open_dict(cfg.hydra.sweeper.params):
            cfg.hydra.sweeper.params["method.loss.gammma"] = "0.1,0.2"
        with pytest.raises(ConfigError, match="gammma"):
            check_sweep_composes(cfg, "train")


# --- cluster agents: GPU trainer, a dir per W&B run, resume (scripts/slurm/agent.sbatch) -------

AGENT = ROOT / "scripts" / "slurm" / "agent.sbatch"


def _agent_cfg(path: Path, monkeypatch, trainer: str | None = None, run_id: str = "run1"):
    """Compose a sweep file's fixed command the way an agent's child process would see it."""
    spec = yaml.safe_load(path.read_text())
    _skip_if_experiment_missing(spec["command"])
    if trainer is None:
        monkeypatch.delenv("SAFEALIGN_TRAINER", raising=False)
    else:
        monkeypatch.setenv("SAFEALIGN_TRAINER", trainer)
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep7")  # what `wandb agent` exports to the program
    monkeypatch.setenv("WANDB_RUN_ID", run_id)
    fixed = [c for c in spec["command"] if c not in check_sweep.MACROS]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(Path(spec["program"]).stem, overrides=fixed, return_hydra_config=True)


@pytest.mark.parametrize("path", WANDB_SWEEPS, ids=lambda p: p.name)
def test_sweep_runs_on_the_gpu_in_a_dir_per_wandb_run_and_resumes(path: Path, monkeypatch):
    cfg = _agent_cfg(path, monkeypatch)
    assert cfg.hydra.runtime.choices.trainer == "gpu" and cfg.trainer.accelerator == "gpu"
    assert cfg.ckpt_path == "auto"  # a re-run of a preempted run id continues its checkpoint
    run_dir = cfg.hydra.run.dir  # resolved now: the agent's environment of this run
    assert run_dir == "outputs/sweeps/sweep7/run1"
    other = _agent_cfg(path, monkeypatch, run_id="run2")  # a parallel agent's run
    assert other.hydra.run.dir == "outputs/sweeps/sweep7/run2"
    v100 = _agent_cfg(path, monkeypatch, trainer="gpu_v100")  # TRAINER=gpu_v100 sbatch ...
    assert v100.trainer.accelerator == "gpu" and v100.trainer.precision == "16-mixed"


@pytest.mark.parametrize(
    ("drop", "message"),
    [("trainer=", "must choose the trainer"), ("launcher=", "not keyed by the W&B run id")],
)
def test_a_sweep_missing_what_an_agent_needs_is_refused(tmp_path: Path, drop: str, message: str):
    spec = yaml.safe_load((ROOT / "sweeps" / "adpo_ratio_grid.yaml").read_text())
    bad = _write(tmp_path, command=[c for c in spec["command"] if not c.startswith(drop)])
    with pytest.raises(DataError, match=message):
        check_sweep.check_sweep_file(bad, CONF)
    no_resume = _write(
        tmp_path, command=[*spec["command"][:-1], "ckpt_path=null", "${args_no_hyphens}"]
    )
    with pytest.raises(DataError, match="a preempted run must resume"):
        check_sweep.check_sweep_file(no_resume, CONF)


FAKES = {  # stand-ins for the cluster's commands: srun runs its command, scontrol records
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    "scontrol": '#!/bin/bash\necho "$@" >> "$FAKE_OUT/scontrol"\n',
    "wandb": """#!PYTHON
import os, signal, sys, time
out = os.environ["FAKE_OUT"]
open(f"{out}/agent", "w").write(" ".join(sys.argv[1:]) + "\\n" + os.environ["SAFEALIGN_TRAINER"])
def stop(signum, frame):  # the agent forwards it to its run, which checkpoints and exits
    open(f"{out}/forwarded", "w").write(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGUSR2, stop)
open(f"{out}/ready", "w").close()
time.sleep(30)
""",
}


def test_agent_script_forwards_the_time_limit_warning_and_requeues(tmp_path: Path):
    import subprocess
    import sys
    import time

    bin_dir, out, submit = tmp_path / "bin", tmp_path / "out", tmp_path / "repo"
    for d in (bin_dir, out, submit / ".venv" / "bin"):
        d.mkdir(parents=True)
    (submit / ".venv" / "bin" / "activate").write_text("")
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text.replace("PYTHON", sys.executable))
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_OUT": str(out),
        "SLURM_SUBMIT_DIR": str(submit),
        "SLURM_JOB_ID": "4242",
        "TRAINER": "gpu_v100",
    }
    job = subprocess.Popen(
        ["bash", str(AGENT), "ent/proj/abc"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not (out / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR2)  # SLURM: --signal=B:USR2@180 goes to the batch shell
    log, _ = job.communicate(timeout=20)
    assert job.returncode == 0, log
    args, trainer = (out / "agent").read_text().splitlines()
    assert args.split() == ["agent", "--forward-signals", "--count", "1", "ent/proj/abc"]
    assert trainer == "gpu_v100"  # TRAINER -> SAFEALIGN_TRAINER -> trainer=${oc.env:...}
    assert (out / "forwarded").read_text() == "SIGUSR2"
    assert (out / "scontrol").read_text().split() == ["requeue", "4242"]
    assert subprocess.run(["bash", "-n", str(AGENT)]).returncode == 0  # the whole script parses
