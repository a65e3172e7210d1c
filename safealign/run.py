"""Task functions behind the thin entry points: seed, check, instantiate, record, fit, export."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from safealign.io import write_json
from safealign.methods.report import finish_run
from safealign.utils import check_required, record_run, setup_logging

log = logging.getLogger("safealign.run")


def build(cfg: DictConfig):
    """Instantiate data (validated first), tokenizer, module and trainer from the config."""
    datamodule = instantiate(cfg.data)  # loads and validates: fails before any model is built
    tokenizer = instantiate(cfg.model.tokenizer)(texts=datamodule.texts())
    module = instantiate(cfg.method)(model_factory=instantiate(cfg.model.lm), tokenizer=tokenizer)
    datamodule.attach(tokenizer, module.record_type, module.needs_toxic)
    trainer = instantiate(cfg.trainer)
    return datamodule, tokenizer, module, trainer


def train(cfg: DictConfig) -> float | None:
    """Train one method; returns `cfg.optimized_metric` from the final metrics (for sweepers)."""
    setup_logging()
    check_required(cfg)
    out_dir = Path(cfg.paths.output_dir)
    hparams = record_run(cfg, out_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, tokenizer, module, trainer = build(cfg)
    for lg in trainer.loggers:
        lg.log_hyperparams(hparams)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = finish_run(cfg, module, datamodule, trainer, out_dir)
    write_json(out_dir / "metrics.json", metrics)
    log.info("outputs in %s", out_dir)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None
