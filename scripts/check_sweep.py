"""Validate W&B sweep files against the Hydra config, before `wandb sweep` sees them.

    python scripts/check_sweep.py sweeps/*.yaml

W&B sweeps need a server, so they cannot be dry-run here; this checks what can go wrong on our
side: the schema (program, method, metric, parameters, a command that passes `${args_no_hyphens}`,
i.e. Hydra's `key=value` syntax: wandb#1427), and that every parameter combination composes as a
Hydra override set (grid: all points; bayes/random: endpoints and seeded draws of every
distribution). An unknown key, a missing group option or a bad value is a clear error naming the
file and the point, before a single agent starts. Last, what a cluster agent
(scripts/slurm/agent.sbatch) needs: an explicit trainer, a run dir keyed by the W&B run id and
`ckpt_path=auto` (`check_agent_ready`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
MACROS = ("${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}",
          "${args_json}", "${args_json_file}", "${args_no_boolean_flags}")


def _uniform(s, rng):
    return [s["min"], s["max"], float(rng.uniform(s["min"], s["max"]))]


def _log_values(s, rng):
    lo, hi = math.log(s["min"]), math.log(s["max"])
    return [s["min"], s["max"], float(math.exp(rng.uniform(lo, hi)))]


def _log_exponents(s, rng):  # min/max are natural-log exponents
    return [math.exp(s["min"]), math.exp(s["max"]), float(math.exp(rng.uniform(s["min"], s["max"])))]


def _normal(s, rng):
    mu, sd = s.get("mu", 0.0), s.get("sigma", 1.0)
    return [mu, mu - 2 * sd, mu + 2 * sd, float(rng.normal(mu, sd))]


def _quantise(draw):
    def f(s, rng):
        q = s.get("q", 1)
        return [round(x / q) * q for x in draw(s, rng)]

    return f


# W&B's distributions (docs.wandb.ai "Sweep configuration options") -> a few representative values
DISTRIBUTIONS = {
    "int_uniform": lambda s, rng: [s["min"], s["max"], int(rng.integers(s["min"], s["max"] + 1))],
    "uniform": _uniform,
    "q_uniform": _quantise(_uniform),
    "log_uniform": _log_exponents,
    "log_uniform_values": _log_values,
    "q_log_uniform": _quantise(_log_exponents),
    "q_log_uniform_values": _quantise(_log_values),
    "inv_log_uniform": lambda s, rng: [1 / x for x in _log_exponents(s, rng)],
    "inv_log_uniform_values": _log_values,
    "normal": _normal,
    "q_normal": _quantise(_normal),
    "log_normal": lambda s, rng: [math.exp(x) for x in _normal(s, rng)],
    "q_log_normal": _quantise(lambda s, rng: [math.exp(x) for x in _normal(s, rng)]),
    "beta": lambda s, rng: [float(rng.beta(s.get("a", 1.0), s.get("b", 1.0))) for _ in range(3)],
}
NEEDS = {"normal": (), "q_normal": (), "log_normal": (), "q_log_normal": (), "beta": ()}


def parameter_values(name: str, spec: Any, rng: np.random.Generator, path: Path) -> list:
    """The values of one parameter to check: all `values`, or samples of its distribution."""
    from safealign.errors import DataError

    if not isinstance(spec, dict):
        raise DataError(path, f"parameter {name!r}: expected a mapping, got {spec!r}")
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise DataError(path, f"parameter {name!r}: `values` must be a non-empty list")
        return list(spec["values"])
    dist = spec.get("distribution")
    if dist is None:  # W&B infers int_uniform / uniform from min and max
        dist = "int_uniform" if all(isinstance(spec.get(k), int) for k in ("min", "max")) else "uniform"
    if dist not in DISTRIBUTIONS:
        raise DataError(path, f"parameter {name!r}: unknown distribution {dist!r}; "
                              f"expected one of {sorted(DISTRIBUTIONS)}")
    need = NEEDS.get(dist, ("min", "max"))
    if missing := [k for k in need if k not in spec]:
        raise DataError(path, f"parameter {name!r}: distribution {dist} needs {missing}")
    if need and not spec["min"] < spec["max"]:
        raise DataError(path, f"parameter {name!r}: min must be < max, got {spec['min']}, {spec['max']}")
    return DISTRIBUTIONS[dist](spec, rng)


def check_schema(spec: Any, path: Path) -> None:
    from safealign.errors import DataError

    if not isinstance(spec, dict):
        raise DataError(path, "a sweep file is a YAML mapping")
    for key in ("program", "method", "metric", "parameters", "command"):
        if key not in spec:
            raise DataError(path, f"missing required key `{key}`")
    if spec["method"] not in METHODS:
        raise DataError(path, f"method must be one of {METHODS}, got {spec['method']!r}")
    metric = spec["metric"]
    if not isinstance(metric, dict) or not metric.get("name") or metric.get("goal") not in GOALS:
        raise DataError(path, f"metric needs a `name` and a `goal` in {GOALS}, got {metric!r}")
    if not (ROOT / spec["program"]).is_file():
        raise DataError(path, f"program {spec['program']!r} is not a file in {ROOT}")
    if not isinstance(spec["parameters"], dict) or not spec["parameters"]:
        raise DataError(path, "`parameters` must be a non-empty mapping")
    cmd = spec["command"]
    if not isinstance(cmd, list) or "${args_no_hyphens}" not in cmd or "${program}" not in cmd:
        raise DataError(path, "`command` must be a list with ${program} and ${args_no_hyphens} "
                              "(Hydra reads key=value, not --key=value)")
    if bad := [c for c in cmd if c in ("${args}", "${args_json}", "${args_json_file}")]:
        raise DataError(path, f"`command` passes {bad}: Hydra needs ${{args_no_hyphens}}")
    if spec["method"] == "grid":
        for name, p in spec["parameters"].items():
            if not isinstance(p, dict) or not ("values" in p or "value" in p):
                raise DataError(path, f"grid parameter {name!r} needs `values` (or `value`)")


def sweep_plan(path: Path, seed: int = 0) -> tuple[str, list[str], list[list[str]]]:
    """(config name, fixed overrides from the command, override sets to compose)."""
    from safealign.hydra_callbacks import sweep_points

    with open(path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    check_schema(spec, path)
    rng = np.random.default_rng(seed)
    axes = {name: [str(v) for v in parameter_values(name, p, rng, path)]
            for name, p in spec["parameters"].items()}
    fixed = [c for c in spec["command"] if c not in MACROS]
    # grid: every point W&B will run; bayes/random: every sample of each parameter in turn
    limit = 10_000 if spec["method"] == "grid" else 0
    return Path(spec["program"]).stem, fixed, sweep_points(axes, limit=limit)


def check_agent_ready(config_name: str, fixed: list[str], path: Path) -> None:
    """DataError unless the command picks a trainer (the default is the CPU one: the agent would
    train on CPU while holding a GPU), keys `hydra.run.dir` by the W&B run id (agents started in
    the same second share a timestamped dir) and resumes with `ckpt_path=auto` (a preempted run
    is re-run by W&B under the same id). `launcher=wandb_agent` provides the last two."""
    from hydra import compose
    from omegaconf import OmegaConf

    from safealign.errors import DataError

    if not any(o.split("=")[0].lstrip("+~") == "trainer" for o in fixed):
        why = "e.g. trainer=${oc.env:SAFEALIGN_TRAINER,gpu}: the default is the CPU one"
        raise DataError(path, f"`command` must choose the trainer, {why}")
    cfg = compose(config_name=config_name, overrides=fixed, return_hydra_config=True)
    run_dir = str(OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"])
    if "oc.env:WANDB_RUN_ID" not in run_dir:
        why = "add launcher=wandb_agent to `command`"
        raise DataError(path, f"hydra.run.dir {run_dir!r} is not keyed by the W&B run id: {why}")
    if cfg.get("ckpt_path") != "auto":
        why = "a preempted run must resume (ckpt_path=auto, set by launcher=wandb_agent)"
        raise DataError(path, f"ckpt_path is {cfg.get('ckpt_path')!r}: {why}")


def check_sweep_file(path: str | Path, config_dir: str | Path = ROOT / "conf") -> int:
    """Validate one sweep file; returns the number of override sets composed."""
    from hydra import initialize_config_dir

    from safealign.errors import ConfigError, DataError
    from safealign.hydra_callbacks import check_overrides_compose

    path = Path(path)
    config_name, fixed, points = sweep_plan(path)
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        try:
            check_overrides_compose(config_name, [fixed + p for p in points])
        except ConfigError as e:
            raise DataError(path, str(e)) from e
        check_agent_ready(config_name, fixed, path)
    return len(points)


def main(argv: list[str] | None = None) -> int:
    from safealign.errors import SafealignError

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args(argv)
    for f in args.files:
        try:
            n = check_sweep_file(f)
        except SafealignError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"ok: {f} ({n} override sets compose)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
