"""Training throughput and peak memory as logged metrics (`perf/*`), so they land in
metrics.json through `trainer.callback_metrics` like any other metric.

Add it to a run with a full `trainer.callbacks=[...]` override (Hydra 1.3 cannot append to a
list from the command line); `scripts/gpu_check.py` builds that override.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping

import lightning.pytorch as L
import torch
from torch import Tensor

GB = 1024**3


def count_tokens(batch) -> int:
    """Non-pad tokens the model reads in `batch`: a typed preference batch counts its own
    (`PreferenceBatch.token_count`: the stacked rows and ADPO's toxic-context rows); a dict batch
    sums every `*attention_mask` tensor, or `input_ids.numel()` without a mask."""
    if hasattr(batch, "token_count"):  # a typed batch (safealign.types.PreferenceBatch)
        return int(batch.token_count())
    if not isinstance(batch, Mapping):
        return 0
    masks = [v for k, v in batch.items() if k.endswith("attention_mask") and isinstance(v, Tensor)]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, Tensor) else 0


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory of this process on CUDA, else its peak RSS (CPU runs)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / GB if sys.platform == "darwin" else rss * 1024 / GB  # macOS: bytes, Linux: KiB


def _sync(device: torch.device) -> None:
    # CUDA kernels are asynchronous: without a sync the clock stops before the step has run.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ThroughputMonitor(L.Callback):
    """Logs `perf/tokens_per_s` (non-pad tokens of all ranks per second of training-batch wall
    time), `perf/step_time_s` (mean batch time: forward, backward and optimizer step; data loading
    and validation excluded) and `perf/peak_mem_gb` (maximum over ranks).

    Args:
        skip_steps: first batches left out of the averages (allocator warm-up, NCCL and DeepSpeed
            set-up, kernel selection); a run shorter than that averages over every batch.
    """

    def __init__(self, skip_steps: int = 1) -> None:
        self.skip_steps = skip_steps
        self._t0 = 0.0
        self._steps: list[tuple[float, float]] = []  # (tokens over all ranks, seconds)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        device = pl_module.device
        _sync(device)
        seconds = time.perf_counter() - self._t0
        tokens = torch.tensor(float(count_tokens(batch)), device=device)
        tokens = trainer.strategy.reduce(tokens, reduce_op="sum")  # every rank's batch
        peak = torch.tensor(peak_memory_gb(device), device=device)
        peak = trainer.strategy.reduce(peak, reduce_op="max")
        self._steps.append((float(tokens), seconds))
        measured = self._steps[self.skip_steps :] or self._steps
        total_tokens = sum(t for t, _ in measured)
        total_seconds = max(sum(s for _, s in measured), 1e-9)
        metrics = {
            "perf/tokens_per_s": total_tokens / total_seconds,
            "perf/step_time_s": total_seconds / len(measured),
            "perf/peak_mem_gb": float(peak),
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)
