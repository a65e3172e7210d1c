"""Shared plumbing for every method module: model creation, optimiser, the train/val/test steps
around one ``_step``, split-named logging (``sync_dist`` on epoch metrics), NaN guard, grad norm,
export."""

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
        self._history: list[dict[str, float]] = []
        self._pending: list[tuple[float, dict[str, Tensor]]] = []  # step metrics, still on device

    @property
    def history(self) -> list[dict[str, float]]:
        """One row of step metrics per training batch (``step`` + every scalar callback metric),
        for metrics.json, history.jsonl and the KL plots."""
        self._flush_history()
        return self._history

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

    def check_finite(self, loss: Tensor, index: Tensor | None, batch_idx: int) -> None:
        """Stop the run on a NaN/inf loss, naming the step and the batch's example indices
        (``index``, Shape: (B,), or None when the batch has none).

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
        rows = index.tolist() if index is not None else "?"
        rank = f" on rank {self.global_rank}" if world > 1 else ""
        raise NonFiniteLossError(
            f"non-finite loss {loss.item()}{rank} at {where}, example indices {rows}; "
            "lower the learning rate, check the data, or use fp32"
        )

    def log_split(
        self, split: str, metrics: dict[str, Tensor], batch_size: int, prog_bar: tuple = ("loss",)
    ) -> None:
        """Log ``f"{split}/{name}"`` (STYLE.md principle 10): per step and per epoch in training,
        per epoch elsewhere. Epoch values of val/test are reduced over all ranks (``sync_dist``),
        so under DDP they cover every rank's shard, not rank 0's."""
        train = split == "train"
        for name, value in metrics.items():
            self.log(
                f"{split}/{name}", value, prog_bar=name in prog_bar, batch_size=batch_size,
                on_step=train, on_epoch=True, sync_dist=not train,
            )  # fmt: skip

    def per_example_loss(self, batch: dict) -> Tensor:
        """Loss per example, Shape: (B,). Modules that keep the default :meth:`_step` define it."""
        raise NotImplementedError

    def _step(self, batch: dict, split: str, batch_idx: int) -> Tensor:
        # The one shared step (STYLE.md principle 9): mean loss, NaN guard, split-named metrics.
        loss = self.per_example_loss(batch).mean()
        self.check_finite(loss, batch["index"], batch_idx)
        self.log_split(split, {"loss": loss}, batch_size=batch["index"].numel())
        return loss

    def training_step(self, batch, batch_idx: int) -> Tensor:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test", batch_idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        if grads:  # one fused per-tensor norm (foreach), on device: no host sync
            norm = torch.stack(torch._foreach_norm(grads, 2)).norm(2)
            if hasattr(norm, "full_tensor"):  # FSDP2 grads are DTensors: log a plain tensor
                norm = norm.full_tensor()  # collective: every rank runs this hook
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # A plain history of step metrics for metrics.json / plots (logger-independent). Lean
        # steps (issue 12 item 2): the values stay on device and reach the host in ONE transfer
        # every `trainer.log_every_n_steps` batches (and whenever `history` is read), instead of
        # one blocking `float()` per metric per step. clone: Lightning may update a value in place.
        metrics = self.trainer.callback_metrics
        row = {k: v.detach().clone() for k, v in metrics.items() if v.numel() == 1}
        self._pending.append((float(self.global_step), row))
        if len(self._pending) >= max(1, self.trainer.log_every_n_steps):
            self._flush_history()

    def _flush_history(self) -> None:
        if not self._pending:
            return
        # float64 holds every fp32/int metric exactly: the numbers float(v) gave
        values = [v.reshape(()).to(torch.float64) for _, row in self._pending for v in row.values()]
        flat = iter(torch.stack(values).cpu().tolist() if values else [])
        for step, row in self._pending:
            self._history.append({"step": step, **{k: next(flat) for k in row}})
        self._pending.clear()

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
