"""Run plumbing: rank-zero logging, required-key checks, run-dir records (config, git SHA, command)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from safealign.errors import ConfigError
from safealign.io import atomic_open, write_json

SECRET_MARKERS = ("api_key", "apikey", "token", "secret", "secrets", "password", "passwd")
REDACTED = "<redacted>"
# `key=value` inside a string: Hydra override lists and `hydra.job.override_dirname` (comma-joined)
_KEY = r"[+~]{0,2}[\w.@/-]+"
_OVERRIDE = re.compile(rf"(?P<key>{_KEY})=(?P<value>.*?)(?=,{_KEY}=|$)", re.DOTALL)


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


def _words(name: str) -> list[str]:
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)  # apiKey -> api_Key
    return [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]


def is_secret_key(key: object) -> bool:
    """True if a config key or dotted override key looks secret: a marker as whole words of one
    segment (`api_key`, `hf_token`, `secret_token`, `logger.wandb.apiKey`), so `tokenizer` and
    `max_new_tokens` are not."""
    for segment in str(key).lstrip("+~").split("."):
        words = _words(segment)
        for marker in SECRET_MARKERS:
            m = marker.split("_")
            if any(words[i : i + len(m)] == m for i in range(len(words) - len(m) + 1)):
                return True
    return False


def redact(obj):
    """Drop values under keys that look secret, so configs and logs never carry W&B keys."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def redact_overrides(text: str) -> str:
    """`key=value` items in `text` (one argv item, an override, a comma-joined override_dirname)
    with the value of every secret-looking key replaced."""

    def sub(m: re.Match) -> str:
        return f"{m['key']}={REDACTED}" if is_secret_key(m["key"]) else m[0]

    return _OVERRIDE.sub(sub, text)


def redact_all(obj):
    """`redact` plus secret overrides inside strings: for Hydra's own files (.hydra/*.yaml,
    multirun.yaml), which carry the command line as `key=value` strings."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) else redact_all(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_all(v) for v in obj]
    return redact_overrides(obj) if isinstance(obj, str) else obj


def redact_yaml_file(path: Path) -> bool:
    """Rewrite a YAML file (atomically) with secrets redacted; True if anything changed."""
    node = OmegaConf.load(path)
    data = OmegaConf.to_container(node, resolve=False)
    clean = redact_all(data)
    if clean == data:
        return False
    with atomic_open(path) as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(clean)))
    return True


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
        f.write(" ".join([sys.executable, *map(redact_overrides, sys.argv)]) + "\n")
    return container


def save_metrics(out_dir: Path, metrics: dict) -> None:
    write_json(out_dir / "metrics.json", metrics)
