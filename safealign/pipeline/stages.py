"""Stage runners shared by `train.py` experiments and the ADPO pipeline.

A stage config is the run config with some groups swapped (e.g. `init.data`, `init.method`); its
cache key is the resolved stage config minus where outputs go, so a β:γ sweep on the
preference stage reuses the same SFT stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from safealign.pipeline.store import ArtifactStore
from safealign.utils import seed_everything

log = logging.getLogger("safealign.pipeline")
REPLACED = ("data", "method", "model")
VOLATILE = ("paths", "hydra", "logger", "ckpt_path", "tags", "task_name", "optimized_metric")


def stage_config(cfg: DictConfig, stage: DictConfig) -> DictConfig:
    """The run config with the stage's groups swapped in: `data`, `method` and `model` REPLACE the
    run's (their keys differ per class), `trainer` and anything else are merged as overrides."""
    base = OmegaConf.to_container(cfg, resolve=False)
    for k in ("init", "pipeline", "isaac_demo"):
        base.pop(k, None)
    stage = OmegaConf.to_container(stage, resolve=False)
    for group in REPLACED:
        if group in stage:
            base[group] = stage.pop(group)
    return OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(stage))


def stage_key(cfg: DictConfig) -> dict:
    """What determines a stage's outputs: its resolved config without output locations."""
    c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    for k in VOLATILE:
        c.pop(k, None)
    c.get("trainer", {}).pop("default_root_dir", None)
    c.get("trainer", {}).pop("callbacks", None)
    c.get("trainer", {}).pop("logger", None)
    c.get("trainer", {}).pop("enable_progress_bar", None)
    return _drop_cache_dirs(c)


def _drop_cache_dirs(obj):
    # Caches (tokenizers, reference log-probs) are content-keyed: where they live never changes a
    # stage's outputs, so a fresh clone elsewhere or a tmp cache dir reuses the same artefacts.
    if isinstance(obj, dict):
        return {k: _drop_cache_dirs(v) for k, v in obj.items() if k != "cache_dir"}
    if isinstance(obj, list):
        return [_drop_cache_dirs(v) for v in obj]
    return obj


def hf_model_config(path: Path) -> DictConfig:
    """`model=hf` pointing at an exported stage model."""
    return OmegaConf.create(
        {
            "name_or_path": str(path),
            "tokenizer": {"_target_": "safealign.models.load_tokenizer", "_partial_": True, "name_or_path": str(path)},
            "lm": {"_target_": "safealign.models.load_causal_lm", "_partial_": True, "name_or_path": str(path)},
        }
    )


def run_init_stage(cfg: DictConfig) -> tuple[Path, str]:
    """Run (or reuse) the SFT stage described by `cfg.init`; returns its exported model dir."""
    out, status = run_fit_stage(cfg, "sft", stage_config(cfg, cfg.init))
    return out / "model", status


def run_fit_stage(
    cfg: DictConfig, stage: str, scfg: DictConfig, key_fn: Callable[[dict], dict] | None = None
) -> tuple[Path, str]:
    """Fit `scfg` (a stage config) in the artefact store under `stage`; returns (stage dir,
    "reused" | "computed"). `key_fn` may rewrite the key (e.g. input paths -> their hashes)."""
    from safealign.run import fit  # local: run imports this module

    store = ArtifactStore(cfg.paths.artifacts_dir)

    def compute(tmp: Path) -> None:
        s = OmegaConf.merge(scfg, {"paths": {"output_dir": str(tmp)}})
        seed_everything(s.seed)
        fit(s, tmp)

    key = stage_key(scfg)
    return store.get_or_compute(stage, key_fn(key) if key_fn else key, compute)
