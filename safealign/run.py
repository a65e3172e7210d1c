"""Task functions behind the thin entry points: seed, check, instantiate, record, fit, export."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from safealign.fit import fit
from safealign.stop import honoured
from safealign.utils import check_required, record_run, seed_everything, setup_logging
from safealign.validate import validate_config

log = logging.getLogger("safealign.run")


@honoured  # stop signals (SLURM's time-limit warning) honoured wherever they land
def train(cfg: DictConfig) -> float | None:
    """Train one method (after its cached SFT init stage, if `init` is set); returns
    `cfg.optimized_metric` from the final metrics, for Hydra sweepers."""
    setup_logging()
    check_required(cfg)
    validate_config(cfg)  # hyper-parameter ranges, before any data or model is built
    out_dir = Path(cfg.paths.output_dir)
    OmegaConf.resolve(cfg.paths)  # freeze hydra-runtime paths before stages copy the config
    if cfg.get("pipeline"):  # a multi-stage run (the ADPO pipeline) drives its own stages
        return instantiate(cfg.pipeline)(cfg).objective
    from safealign.eval.in_run import plan_eval  # imports transformers: after that exit too
    from safealign.resume import (
        resolve_ckpt_path,  # imports Lightning: after the cached-pipeline exit
    )

    ckpt_path = resolve_ckpt_path(cfg)  # checked against this run's model before any work
    evaluation = plan_eval(cfg)  # eval set and scorers loaded before any training (conf/eval)
    if cfg.get("init"):
        from safealign.pipeline.stages import hf_model_config, run_init_stage

        model_dir = run_init_stage(cfg)
        with open_dict(cfg):
            cfg.model = hf_model_config(model_dir, cfg.model)  # only the weights path changes
    record_run(cfg, out_dir)
    seed_everything(cfg.seed)
    metrics = fit(cfg, out_dir, ckpt_path, evaluation)
    log.info("outputs in %s", out_dir)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None
