"""Run fingerprint: every config value that changes the trained weights, recorded beside a run's
checkpoints (`fingerprint.json`) and compared before a checkpoint is resumed.

A re-submitted grid writes into the same sweep dirs: if only the model were compared, point 3
(β=0.3) would resume point 3's old checkpoint trained with β=0.1. So the fingerprint is the
whole composed config minus what cannot change the weights:

* bookkeeping and evaluation-only top-level keys (`_DROP_TOP`: paths, hydra, logger, tags...);
* any `cache_dir` (where a cache lives is not what it holds);
* a trainer's output, logging and validation settings (`_TRAINER_IO`);
* the run's own length (`_RUN_LENGTH`): extending a run (more epochs) must still resume it. An
  init stage's length decides the weights this run starts from, so `init.trainer` keeps it.

The config is walked key by key, so a dropped key (often `${hydra:...}`) is never resolved.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from safealign.cache import without_cache_dirs
from safealign.errors import ConfigError
from safealign.utils import is_secret_key

log = logging.getLogger(__name__)
FINGERPRINT = "fingerprint.json"
FINGERPRINT_VERSION = 2  # version 1 (no version key): model, module class, data source only
_DROP_TOP = frozenset(
    "paths hydra logger ckpt_path tags task_name optimized_metric eval eval_set scorer "
    "generation".split()
)
_TRAINER_IO = frozenset(
    "default_root_dir callbacks logger enable_progress_bar enable_model_summary "
    "log_every_n_steps val_check_interval check_val_every_n_epoch limit_val_batches "
    "num_sanity_val_steps".split()
)
_RUN_LENGTH = frozenset({"max_epochs", "max_steps", "max_time"})
# where version 1 took its entries from, to compare an old fingerprint.json with a new run
_LEGACY = {
    "model": ("model",),
    "method": ("method", "_target_"),
    "data.source": ("data", "source"),
    "init.method": ("init", "method", "_target_"),
    "init.data.source": ("init", "data", "source"),
}


def run_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The weight-relevant config as plain data (β, γ, lr, eps, τ, seed, precision... all
    count). Take it BEFORE the init stage swaps `cfg.model`."""
    return {"fingerprint_version": FINGERPRINT_VERSION, **_plain(without_cache_dirs(cfg), ())}


def check_fingerprint(ckpt: Path, fingerprint: dict[str, Any]) -> None:
    """ConfigError listing the differences (e.g. `method.loss.beta: 0.1 -> 0.3`) unless the
    fingerprint beside `ckpt` equals `fingerprint`; a warning if there is none to compare."""
    side = ckpt.parent / FINGERPRINT
    if not side.exists():
        log.warning(
            "%s has no %s beside it: cannot verify it belongs to this run", ckpt, FINGERPRINT
        )
        return
    old = json.loads(side.read_text())
    if "fingerprint_version" not in old:  # written before every weight-relevant key counted
        log.warning("%s predates full fingerprints: only model, module, data are verified", side)
        fingerprint = _legacy_view(fingerprint)
    if old == fingerprint:
        return
    diff = _diff(old, fingerprint)
    lines = diff[:8] + ([f"... and {len(diff) - 8} more"] if len(diff) > 8 else [])
    raise ConfigError(
        "ckpt_path",
        f"{ckpt} was written by a run with a different configuration; differences:\n  "
        + "\n  ".join(lines)
        + "\nResume needs every value that changes the weights to match (model, method and its "
        "hyperparameters, data, seed, precision...). To start fresh use ckpt_path=null (or "
        "another output dir); to warm-start from its weights use the exported model "
        "(model=hf model.name_or_path=<run dir>/model).",
    )


def _dropped(path: tuple[str, ...]) -> frozenset[str]:
    if not path:
        return _DROP_TOP
    if path == ("trainer",):
        return _TRAINER_IO | _RUN_LENGTH
    if path[-1] == "trainer":  # e.g. init.trainer
        return _TRAINER_IO
    return frozenset()


def _plain(node: Any, path: tuple[str, ...]) -> Any:
    if isinstance(node, DictConfig):
        drop = _dropped(path)
        out = {}
        for k in node:
            if k in drop:
                continue
            if OmegaConf.is_missing(node, k):
                out[k] = "???"
            elif is_secret_key(str(k)):  # a W&B key or token never changes the weights
                out[k] = "<redacted>"
            else:
                out[k] = _plain(node[k], (*path, str(k)))
        return out
    if isinstance(node, ListConfig):
        return [_plain(v, path) for v in node]
    return node


def _legacy_view(fingerprint: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, keys in _LEGACY.items():
        node: Any = fingerprint
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            out[name] = node
    return out


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) or isinstance(new, dict):  # recurse, so a line names one leaf
        old, new = _as_dict(old), _as_dict(new)
        if old is not None and new is not None:
            out = []
            for k in sorted(set(old) | set(new), key=str):
                out += _diff(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{prefix}{k}.")
            return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _as_dict(x: Any) -> dict | None:
    return {} if x is _ABSENT else x if isinstance(x, dict) else None


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()
