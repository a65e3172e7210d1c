"""Stage runners shared by `train.py` experiments and the ADPO pipeline.

A stage config is the run config with some groups swapped (e.g. `init.data`, `init.method`); its
cache key is the resolved stage config minus where outputs go, so a β:γ sweep on the
preference stage reuses the same SFT stage.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as L
from omegaconf import DictConfig, OmegaConf

from safealign.pipeline.store import ArtifactStore

log = logging.getLogger("safealign.pipeline")
REPLACED = ("data", "method", "model")
VOLATILE = ("paths", "hydra", "logger", "ckpt_path", "tags", "task_name", "optimized_metric")


def stage_config(cfg: DictConfig, stage: DictConfig) -> DictConfig:
    """The run config with the stage's groups swapped in: `data`, `method` and `model` REPLACE the
    run's (their keys differ per class), `trainer` and anything else are merged as overrides."""
    base = OmegaConf.to_container(cfg, resolve=False)
    for k in ("init", "pipeline"):
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
    return c


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
    from safealign.run import fit  # local: run imports this module

    scfg = stage_config(cfg, cfg.init)
    store = ArtifactStore(cfg.paths.artifacts_dir)

    def compute(tmp: Path) -> None:
        s = OmegaConf.merge(scfg, {"paths": {"output_dir": str(tmp)}})
        L.seed_everything(s.seed, workers=True)
        fit(s, tmp)

    out, status = store.get_or_compute("sft", stage_key(scfg), compute)
    return out / "model", status
