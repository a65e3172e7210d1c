"""What every run ends with: exported model, final metrics, history, a logged summary."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from safealign.io import write_jsonl
from safealign.utils import rank_zero

log = logging.getLogger("safealign.run")


def final_metrics(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def log_summary(title: str, out_dir: Path, metrics: dict[str, float]) -> None:
    """The run's result on the terminal (and in its log file): final metrics, one per line."""
    if not rank_zero():  # a logger filter on "safealign" would not see "safealign.run" records
        return
    lines = [f"\n=== {title} ===", f"outputs: {out_dir}"]
    for k in sorted(metrics):
        if k.endswith(("_step", "_epoch")):  # duplicates of the epoch-level value
            continue
        lines.append(f"  {k:<32} {metrics[k]:.4f}")
    log.info("\n".join(lines))


def finish_run(cfg: DictConfig, module, datamodule, trainer, out_dir: Path) -> dict[str, float]:
    """Export (all ranks gather, rank zero writes), collect final metrics and the module's own
    summary (on every rank when the model is sharded: its forwards are collective), log."""
    from safealign.sharding import is_sharded

    metrics = final_metrics(trainer)
    path = module.export(out_dir / "model")  # collective under ZeRO-3 / FSDP
    if trainer.is_global_zero:
        log.info("exported model + tokenizer (safetensors) to %s", path)
        write_jsonl(out_dir / "history.jsonl", module.history)
    if is_sharded(module.model) or trainer.is_global_zero:
        with trainer.precision_plugin.forward_context():
            metrics.update(module.summarize(datamodule, out_dir))
    log_summary(f"{type(module).__name__} finished", out_dir, metrics)
    return metrics
