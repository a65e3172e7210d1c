"""Run plumbing: rank-zero logging, required-key checks, run-dir records (config, git SHA, command)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from safealign.errors import ConfigError
from safealign.io import atomic_open, write_json

SECRET_MARKERS = ("api_key", "apikey", "token", "secret", "password")


def rank_zero() -> bool:
    """True on the global rank-0 process (torchrun, SLURM, Lightning, MPI: safealign.ranks)."""
    from safealign.ranks import is_rank_zero

    return is_rank_zero()


class RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return rank_zero()


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger("safealign")
    root.setLevel(level)
    if not any(isinstance(f, RankZeroFilter) for f in root.filters):
        root.addFilter(RankZeroFilter())


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (and dataloader workers). Lightning imported only here: a
    fully-cached pipeline rerun never pays its import time."""
    import lightning.pytorch as L

    L.seed_everything(seed, workers=True)


def check_required(cfg: DictConfig) -> None:
    """Fail before any heavy work if a `???` value is still missing (STYLE.md principle 7)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    missing = [k for k in missing if not k.startswith("hydra.")]
    if missing:
        raise ConfigError(
            missing[0],
            "required value is missing (`???`); set it on the command line, e.g. "
            + " ".join(f"{k}=..." for k in missing),
        )


def redact(obj):
    """Drop values under keys that look secret, so configs and logs never carry W&B keys."""
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if any(m in str(k).lower() for m in SECRET_MARKERS) else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def resolved_config(cfg: DictConfig) -> dict:
    return redact(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


def git_sha() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def record_run(cfg: DictConfig, out_dir: Path) -> dict:
    """Write resolved_config.yaml, git_sha.txt and command.txt into the run dir (atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    container = resolved_config(cfg)
    with atomic_open(out_dir / "resolved_config.yaml") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(container)))
    with atomic_open(out_dir / "git_sha.txt") as f:
        f.write(git_sha() + "\n")
    with atomic_open(out_dir / "command.txt") as f:
        f.write(" ".join([sys.executable, *sys.argv]) + "\n")
    return container


def save_metrics(out_dir: Path, metrics: dict) -> None:
    write_json(out_dir / "metrics.json", metrics)
