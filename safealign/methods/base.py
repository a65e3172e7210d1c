"""Shared plumbing for every method module: model creation, optimiser, NaN guard, grad norm, export."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as L
import torch
from torch import Tensor

from safealign.errors import NonFiniteLossError
from safealign.sharding import preload_model_classes

log = logging.getLogger(__name__)


class BaseModule(L.LightningModule):
    """Args:
    model_factory: `model_factory(tokenizer) -> nn.Module`, a Hydra `_partial_` (model group).
    tokenizer: the run's tokenizer (with `[TOXIC]` registered).
    optimizer: `optimizer(params) -> Optimizer`, a Hydra `_partial_`.
    scheduler: optional `scheduler(optimizer) -> LRScheduler`, a Hydra `_partial_`.
    """

    record_type: type = object
    needs_toxic: bool = False

    def __init__(
        self,
        model_factory: Callable,
        tokenizer,
        optimizer: Callable,
        scheduler: Callable | None = None,
    ) -> None:
        super().__init__()
        self.model_factory, self.tokenizer = model_factory, tokenizer
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.model = None
        preload_model_classes(model_factory)  # before any zero.Init context (safealign.sharding)
        self.history: list[dict[str, float]] = []

    def configure_model(self) -> None:
        # Lightning calls this inside the strategy's context (FSDP/DeepSpeed), so sharded
        # strategies can build the model directly sharded. Idempotent.
        if self.model is None:
            self.model = self._shard(self.model_factory(self.tokenizer))

    def _shard(self, model):
        # A strategy that shards in configure_model (FSDP2: safealign.fsdp2) says so by having
        # `shard_module`; the method code never asks which strategy it runs under.
        shard = getattr(self._trainer.strategy, "shard_module", None) if self._trainer else None
        return shard(model) if shard is not None else model

    def on_fit_start(self) -> None:
        # from_pretrained returns eval mode; Lightning keeps module modes as found.
        self.model.train()

    def configure_optimizers(self):
        opt = self.optimizer_factory(p for p in self.parameters() if p.requires_grad)
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def check_finite(self, loss: Tensor, batch: dict, batch_idx: int) -> None:
        """Stop the run on a NaN/inf loss, naming the step and the batch's example indices.

        Collective: with several ranks, a NaN on ONE rank stops ALL of them (otherwise the others
        wait forever in the gradient all-reduce), each naming the step."""
        bad = not bool(torch.isfinite(loss))
        world = self._trainer.world_size if self._trainer else 1
        any_bad = (
            self.trainer.strategy.reduce_boolean_decision(bad, all=False) if world > 1 else bad
        )
        if not any_bad:
            return
        where = f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if not bad:
            raise NonFiniteLossError(
                f"non-finite loss on another rank at {where}; that rank's message names the examples"
            )
        idx = batch.get("index")
        rows = idx.tolist() if idx is not None else "?"
        rank = f" on rank {self.global_rank}" if world > 1 else ""
        raise NonFiniteLossError(
            f"non-finite loss {loss.item()}{rank} at {where}, example indices {rows}; "
            "lower the learning rate, check the data, or use fp32"
        )

    def _step(self, batch: dict, split: str, batch_idx: int) -> torch.Tensor:
        raise NotImplementedError  # each method's one shared step (STYLE.md principle 9)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test", batch_idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = [p.grad.detach().norm(2) for p in self.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm(2), on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Keep a plain history of step metrics for metrics.json / plots (logger-independent).
        row = {"step": float(self.global_step)}
        row.update(
            {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        )
        self.history.append(row)

    def summarize(self, datamodule, out_dir) -> dict[str, float]:
        """Method-specific end-of-run metrics (and files in out_dir); none by default.

        Called on EVERY rank when the model is sharded (its forwards are collective: same inputs,
        same order on all ranks), on rank 0 only otherwise; write files on global rank 0 only."""
        return {}

    def export(self, out_dir: str | Path) -> Path:
        """save_pretrained (safetensors) of the full model and tokenizer, for `model=hf` to load.
        Collective: every rank calls it; weights are gathered from ZeRO-3/FSDP shards and LoRA is
        merged (safealign.sharding), rank 0 writes."""
        from safealign.sharding import export_pretrained

        return export_pretrained(self.model, self.tokenizer, out_dir)
