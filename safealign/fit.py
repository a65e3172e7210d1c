"""Build and fit one Lightning run: the step shared by `train.py` (`safealign.run.train`) and every
training stage of a pipeline (`safealign.pipeline.stages.run_fit_stage`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hydra.utils import instantiate
from omegaconf import DictConfig

from safealign.io import write_json
from safealign.methods.report import finish_run
from safealign.ranks import is_rank_zero
from safealign.utils import adopt_library_loggers, resolved_config

if TYPE_CHECKING:  # the evaluation imports transformers: only its caller (run.train) loads it
    from safealign.eval.in_run import InRunEval


def build(cfg: DictConfig):
    """Instantiate data (validated first), tokenizer, module and trainer from the config."""
    datamodule = instantiate(cfg.data)  # loads and validates: fails before any model is built
    tokenizer = instantiate(cfg.model.tokenizer)(texts=datamodule.texts())
    module = instantiate(cfg.method)(model_factory=instantiate(cfg.model.lm), tokenizer=tokenizer)
    datamodule.attach(tokenizer, module.record_type, module.needs_toxic)
    trainer = instantiate(cfg.trainer)
    adopt_library_loggers()  # transformers and Lightning are imported by now
    return datamodule, tokenizer, module, trainer


def fit(
    cfg: DictConfig,
    out_dir: Path,
    ckpt_path: str | None = None,
    evaluation: InRunEval | None = None,
) -> dict[str, float]:
    """Build, fit, export into `out_dir`; then, if given, run the end-of-run `evaluation` on the
    exported model (its eval/* metrics join the rest); returns the final metrics (also in
    metrics.json)."""
    datamodule, _, module, trainer = build(cfg)
    hparams = resolved_config(cfg)
    for lg in trainer.loggers:
        lg.log_hyperparams(hparams)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = finish_run(cfg, module, datamodule, trainer, out_dir)
    if evaluation is not None:  # rank 0 only (plan_eval), after the export every rank joined
        device = str(trainer.strategy.root_device)  # sample where the run trained (GPU on GPU)
        metrics |= evaluation(out_dir, trainer.loggers, trainer.global_step, device)
    if is_rank_zero():  # one writer: the other ranks lack eval/* (rank 0 alone evaluates)
        write_json(out_dir / "metrics.json", metrics)
    return metrics
