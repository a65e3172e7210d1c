"""Hydra callbacks (registered in conf/hydra/default.yaml) that make multiruns safe.

* `WandbFinish`: one `wandb.finish()` per job, so every sweep point is its own W&B run (without
  it, jobs that share a process log into the first job's run: lightning-hydra-template#289,
  wandb#1314).
* `MultirunGuard`: checks before the sweeper launches anything, so a bad sweep stops with one
  clear error (exit status 2) instead of N failed (or N submitted-then-failed SLURM) jobs:
  every swept key and value composes; no re-executing DDP inside a local multirun; an explicit
  `ckpt_path` was written with this weight-relevant config (`safealign.fingerprint`).
* `RedactSecrets`: secret-looking overrides (`+logger.wandb.api_key=...`) redacted in the files
  Hydra wrote before the job started: `.hydra/{config,hydra,overrides}.yaml` and the sweep's
  `multirun.yaml` (hydra/core/utils.py::run_job saves them just before `on_job_start`).

Imports stay light (no torch/lightning at import): Hydra instantiates callbacks on every start.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from safealign.cli import fail
from safealign.errors import ConfigError, SafealignError
from safealign.utils import redact_overrides, redact_yaml_file
from safealign.validate import config_errors

MAX_COMBINATIONS = 64  # beyond this, each swept key is checked on its own (others at 1st value)


def finish_wandb() -> None:
    """Finish the active W&B run, if wandb was imported and a run is open."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


class WandbFinish(Callback):
    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        finish_wandb()


class RedactSecrets(Callback):
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        for path in hydra_files(config):
            redact_yaml_file(path)
        task = OmegaConf.select(config, "hydra.overrides.task", default=[]) or []
        if any(redact_overrides(str(ov)) != str(ov) for ov in task):
            # W&B stores sys.argv in its run metadata (wandb_settings._args -> run-*.wandb);
            # with a secret on the command line, that job records no system metadata.
            os.environ.setdefault("WANDB_X_DISABLE_META", "true")


def hydra_files(config: DictConfig) -> list[Path]:
    """The YAML files Hydra has written for this job: its `.hydra/*.yaml` and, in a multirun,
    the sweep dir's `multirun.yaml` (located from the job's dir: `sweep.dir` may hold ${now:})."""
    hc = config.hydra
    out = Path(hc.runtime.output_dir)
    files = sorted((out / hc.output_subdir).glob("*.yaml")) if hc.output_subdir else []
    if hc.mode == RunMode.MULTIRUN:
        depth = len(Path(str(hc.sweep.subdir)).parts)
        files += [p for p in [out.parents[depth - 1] / "multirun.yaml"] if p.is_file()]
    return files


class MultirunGuard(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_parallel_strategy(config)
            check_sweep_composes(config, kwargs.get("config_name") or "train")
            check_explicit_checkpoint(config)
        except SafealignError as e:
            # Hydra 1.3 turns an Exception raised in a callback into a warning and launches the
            # sweep anyway (hydra/_internal/callbacks.py); only a BaseException stops it here.
            fail(e)


def check_parallel_strategy(config: DictConfig) -> None:
    """ConfigError for DDP that re-executes `sys.argv` inside a multirun not started by SLURM."""
    from safealign.distributed import starts_script_subprocesses

    launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
    if launcher.endswith("SlurmLauncher"):
        return  # SLURM starts one task per device; Lightning does not re-execute anything
    trainer = config.get("trainer") or {}
    devices = _select(trainer, "devices", 1)
    num_nodes = _select(trainer, "num_nodes", 1)
    if not starts_script_subprocesses(trainer.get("strategy", "auto"), devices, num_nodes):
        return
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    why = (
        "the optuna sweeper would even hand each rank different hyperparameters"
        if "optuna" in sweeper.lower()
        else "each re-executed rank would re-run the whole sweep"
    )
    raise ConfigError(
        "trainer.strategy",
        f"DDP with start_method=popen starts ranks 1..N by re-running the command line; inside "
        f"a Hydra multirun {why} (ENV.md, lightning-hydra-template#393). Use strategy=ddp_spawn, "
        "or launcher=slurm (SLURM starts one task per GPU), or run the points one by one.",
    )


def _select(node: Any, key: str, default: Any) -> Any:
    try:
        value = OmegaConf.select(node, key, default=default)
    except Exception:  # e.g. ${hydra:...} not resolvable here: treat as unknown
        return "unknown"
    return value


def sweep_axes(config: DictConfig) -> tuple[list[str], dict[str, list[str]]]:
    """(fixed task overrides, {swept key: candidate values}) from the command line and
    `hydra.sweeper.params`. Intervals (optuna) contribute their lower bound; globs are skipped
    (their options are existing config files)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    task = list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    lines = [f"{k}={v}" for k, v in params.items()] + task  # command line wins, as in the sweepers
    fixed: list[str] = []
    axes: dict[str, list[str]] = {}
    for ov in parser.parse_overrides(lines):
        key = ov.get_key_element()
        if not ov.is_sweep_override():
            fixed.append(ov.input_line or f"{key}={ov.get_value_element_as_str()}")
            axes.pop(key, None)
            continue
        values = _sweep_values(ov)
        if values is not None:
            axes[key] = values
    return fixed, axes


def _sweep_values(ov) -> list[str] | None:
    from hydra.core.override_parser.types import (
        ChoiceSweep,
        Glob,
        IntervalSweep,
        RangeSweep,
        Transformer,
    )

    v = ov.value()
    if isinstance(v, IntervalSweep):
        return [Transformer.str(int(v.start) if "int" in v.tags else v.start)]
    if isinstance(v, ChoiceSweep):
        return [Transformer.str(x) for x in v.list]  # never shuffled: validation order
    if isinstance(v, RangeSweep):
        return [Transformer.str(x) for x in v.range()]
    if isinstance(v, Glob):
        return None
    return [Transformer.str(x) for x in v]  # simple a,b,c


def sweep_points(axes: dict[str, list[str]], limit: int = MAX_COMBINATIONS) -> list[list[str]]:
    """Every combination (or, beyond `limit`, each value of each key with the others at their
    first value) as override lists."""
    keys = list(axes)
    total = 1
    for k in keys:
        total *= len(axes[k])
    if total <= limit:
        combos = itertools.product(*axes.values())
        return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)] for combo in combos]
    first = {k: vals[0] for k, vals in axes.items()}
    points = [[f"{j}={v if j == k else first[j]}" for j in keys] for k in keys for v in axes[k]]
    return [p for i, p in enumerate(points) if p not in points[:i]]  # the all-first point once


def check_overrides_compose(config_name: str, points: list[list[str]]) -> None:
    """ConfigError naming the first override set that does not compose (unknown key, missing
    group option, bad value syntax) or holds a value out of range (`safealign.validate`).
    Needs an initialised Hydra (an app or `initialize_*`)."""
    from hydra import compose

    for overrides in points:
        try:
            cfg = compose(config_name=config_name, overrides=overrides)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                "hydra.sweeper.params",
                f"sweep point [{' '.join(overrides)}] does not compose: {msg}",
            ) from e
        errors = config_errors(cfg)
        if errors:
            where = f"sweep point [{' '.join(overrides)}]"
            raise ConfigError(errors[0].key, f"{errors[0].detail} ({where})")


def check_sweep_composes(config: DictConfig, config_name: str) -> None:
    fixed, axes = sweep_axes(config)
    if axes:
        check_overrides_compose(config_name, [fixed + p for p in sweep_points(axes)])


def check_explicit_checkpoint(config: DictConfig) -> None:
    """An explicit `ckpt_path` (not null/auto/last) must be a checkpoint of this configuration."""
    value = config.get("ckpt_path")
    if value in (None, "", "null", "auto", "last"):
        return
    from pathlib import Path

    from safealign.resume import check_checkpoint, run_fingerprint

    path = Path(str(value)).expanduser()
    if not path.exists():
        raise ConfigError("ckpt_path", f"checkpoint {path} does not exist")
    with _hydra_config_set(config):
        fingerprint = run_fingerprint(config)
    check_checkpoint(path, fingerprint)


@contextlib.contextmanager
def _hydra_config_set(config: DictConfig) -> Iterator[None]:
    # The fingerprint resolves e.g. data.source.path -> paths.data_dir -> ${hydra:runtime.cwd},
    # but on_multirun_start runs before any job has set HydraConfig: set it from (a copy of)
    # this config for the duration (set_config makes the node it is given read-only).
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() or "hydra" not in config:
        yield
        return
    HydraConfig.instance().set_config(copy.deepcopy(config))
    try:
        yield
    finally:
        HydraConfig.instance().cfg = None
