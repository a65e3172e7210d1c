"""PreferenceModule: DPO and ADPO in one LightningModule; the loss is injected by config.

pi_ref is the frozen initial (SFT) policy; pi_t (ADPO's inner toxic model) is the same frozen
weights conditioned on `[TOXIC]` (METHODS.md A.1, A.3). By default both are precomputed once from
the initial weights and cached, so training holds ONE model (no frozen copy, nothing for ZeRO-3 to
wrap twice). `toxic_ref=policy_detached` scores pi_t with the current policy (no grad) each step.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from safealign.errors import ConfigError
from safealign.logps import concatenated_forward, single_forward
from safealign.methods import reference as ref
from safealign.methods.base import BaseModule
from safealign.methods.plots import plot_kl
from safealign.sharding import layout
from safealign.types import LossOut, PreferenceExample, SeqLogps

log = logging.getLogger(__name__)
TOXIC_REFS = ("frozen_sft", "policy_detached")


class PreferenceModule(BaseModule):
    """Args (beyond BaseModule): loss: `loss(policy, reference) -> LossOut` (a `_partial_` from
    safealign.losses); needs_toxic: batches carry [chosen; rejected; toxic] (ADPO);
    precompute_reference: cache reference logps once (default) instead of a frozen model;
    reference_batch_size: pairs per forward of that precompute (no grad, so it can exceed the
    training batch; None = the data module's batch sizes);
    average_logps: mean instead of sum per sequence (IPO convention)."""

    record_type = PreferenceExample

    def __init__(
        self,
        model_factory: Callable,
        tokenizer,
        optimizer: Callable,
        loss: Callable[[SeqLogps, SeqLogps], LossOut],
        scheduler: Callable | None = None,
        needs_toxic: bool = False,
        toxic_ref: str = "frozen_sft",
        precompute_reference: bool = True,
        average_logps: bool = False,
        cache_dir: str | None = None,
        reference_batch_size: int | None = None,
    ) -> None:
        super().__init__(model_factory, tokenizer, optimizer, scheduler)
        if toxic_ref not in TOXIC_REFS:
            raise ConfigError(
                "method.toxic_ref", f"expected one of {TOXIC_REFS}, got {toxic_ref!r}"
            )
        self.loss_fn, self.needs_toxic, self.toxic_ref = loss, needs_toxic, toxic_ref
        self.precompute, self.average = precompute_reference, average_logps
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if reference_batch_size is not None and reference_batch_size < 1:
            raise ConfigError(
                "method.reference_batch_size", f"must be >= 1 or null, got {reference_batch_size}"
            )
        self.reference_batch_size = reference_batch_size
        self.reference = None  # frozen copy, only for on-the-fly reference
        self.ref_cache: dict[str, dict[str, torch.Tensor]] | None = None

    def configure_model(self) -> None:
        # Runs BEFORE Lightning restores a checkpoint, so the weights here are the initial (SFT)
        # ones: the only correct source of pi_ref / pi_t, on a fresh run and on resume alike.
        if self.model is not None:
            return
        if not self.precompute:  # the frozen copy is taken before any sharding
            if layout(built := self.model_factory(self.tokenizer)) == "zero3":
                raise ConfigError(
                    "method.precompute_reference",
                    "false needs a full frozen copy of the model, which ZeRO-3 partitions away; "
                    "keep the default (true) under strategy=deepspeed_z3*",
                )
            self.reference = [copy.deepcopy(built).requires_grad_(False).eval()]  # not a submodule
            self.model = self._shard(built)
            return
        super().configure_model()
        if not self._reference_after_setup():
            self.ref_cache = self._load_or_compute_reference()

    def _reference_after_setup(self) -> bool:
        # Strategies that wrap/shard in setup (DeepSpeed, FSDP, ModelParallel) also restore a
        # checkpoint only after setup: on_fit_start still sees the initial weights, on the
        # engine's own (sharded, cast) parameters. DDP/single device restore before setup, so
        # configure_model is the last point with the initial weights there.
        return bool(getattr(self.trainer.strategy, "restore_checkpoint_after_setup", False))

    def _load_or_compute_reference(self) -> dict[str, dict[str, torch.Tensor]]:
        dm, trainer = self.trainer.datamodule, self.trainer
        key = ref.reference_key(
            self.model, self.tokenizer, dm.encoded, self.average, self.needs_toxic,
            source=ref.source_identity(self.model_factory), precision=str(trainer.precision),
        )  # fmt: skip
        sizes = {s: len(rows) for s, rows in dm.encoded.items()}
        path = self.cache_dir / f"reflogps-{key}.safetensors" if self.cache_dir else None
        cache = ref.load_cache(path, key, sizes) if path else None
        log.info("reference log-probs: %s (key %s)", "reused" if cache else "computed", key)
        if cache is None:
            cache = self._compute_reference(dm, sizes)
            if path and trainer.is_global_zero:
                ref.save_cache(path, key, cache)
        return cache

    def _compute_reference(self, dm, sizes: dict[str, int]) -> dict[str, dict[str, torch.Tensor]]:
        device = self.trainer.strategy.root_device
        if layout(self.model) == "plain":
            self.model.to(device)
        ctx = self.trainer.precision_plugin.forward_context  # the policy's autocast (item 1)
        collate, cache = dm.collator(), {}
        for split, n in sizes.items():
            if not n:
                continue
            bs = self.reference_batch_size or (
                dm.batch_size if split == "train" else dm.eval_batch_size
            )
            items = list(enumerate(dm.encoded[split]))
            cache[split] = ref.sharded_reference(
                self.model, items, collate, bs, self.average, device, ctx, _stop_check
            )
        return cache

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.precompute and self.ref_cache is None:
            self.ref_cache = self._load_or_compute_reference()
            self.model.train()
        if self.reference is not None:  # not a submodule, so the strategy does not move it
            self.reference[0].to(self.device)

    def reference_logps(self, batch: dict, split: str, n_way: int) -> SeqLogps:
        n = batch["index"].numel()
        with torch.no_grad():
            if self.ref_cache is not None:
                c, idx = self.ref_cache[split], batch["index"].cpu()
                dev = batch["input_ids"].device
                chosen, rejected = c["chosen"][idx].to(dev), c["rejected"][idx].to(dev)
                toxic = c["toxic"][idx].to(dev) if n_way == 3 and "toxic" in c else None
            else:
                rows = (batch[k][: 2 * n] for k in ("input_ids", "attention_mask", "labels"))
                r = concatenated_forward(self.reference[0], *rows, 2, self.average)
                chosen, rejected, toxic = r.chosen, r.rejected, None
                if n_way == 3:
                    toxic = self._pi_t(batch, self.reference[0])
            if n_way == 3 and self.toxic_ref == "policy_detached":
                toxic = self._pi_t(batch, self.model)
        return SeqLogps(chosen, rejected, toxic)

    def _pi_t(self, batch: dict, model) -> torch.Tensor:
        args = (
            batch["toxic_ctx_input_ids"],
            batch["toxic_ctx_attention_mask"],
            batch["toxic_ctx_labels"],
        )
        return single_forward(model, *args, self.average)

    def _step(self, batch: dict, split: str, batch_idx: int) -> torch.Tensor:
        n_way = 3 if "toxic_ctx_input_ids" in batch else 2
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        policy = concatenated_forward(self.model, ids, mask, labels, n_way, self.average)
        reference = self.reference_logps(batch, split, n_way)
        if split == "train" and self.global_step == 0 and self.ref_cache is not None:
            self._check_step0(policy, reference, batch_idx)
        out = self.loss_fn(policy, reference)
        loss = out.losses.mean()
        self.check_finite(loss, batch, batch_idx)
        self._log_metrics(split, loss, out, policy, reference)
        return loss

    def _check_step0(self, policy: SeqLogps, reference: SeqLogps, batch_idx: int) -> None:
        """Before the first update the policy IS the reference: a cached reference that does not
        reproduce it (stale or corrupt cache, a different model or precision) would bias every
        reward, so stop (issue 14 item 1). Skipped when dropout makes the two forwards differ.
        Tolerance: float noise of summed log-probs (fp32: 1e-3 nats; 16-bit autocast, where
        padding and batch shape move low bits: 1 nat, with a warning above 1e-3)."""
        if self.model.training and any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.modules()
        ):
            return
        gap = max(float((p - r).abs().max()) for p, r in
                  ((policy.chosen, reference.chosen), (policy.rejected, reference.rejected)))  # fmt: skip
        half = "16" in str(self.trainer.precision)
        if gap > (1.0 if half else 1e-3):
            raise RuntimeError(
                f"step 0, batch {batch_idx}: the cached reference log-probs differ from the "
                f"policy's by {gap:.4g} nats before any update (expected ~0): the reference cache "
                "does not belong to this model/data/precision; delete it (method.cache_dir) and rerun"
            )
        if gap > 1e-3:
            log.warning("step 0: reference vs policy log-probs differ by %.3g nats (16-bit)", gap)

    def _log_metrics(
        self, split: str, loss, out: LossOut, policy: SeqLogps, reference: SeqLogps
    ) -> None:
        # TRL names (METHODS.md C.4) + ADPO extras and kl/* = mean policy-reference log-ratio (A.4).
        m = {
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
            "logps/chosen": policy.chosen.detach().mean(),
            "logps/rejected": policy.rejected.detach().mean(),
            "kl/chosen": (policy.chosen - reference.chosen).detach().mean(),
            "kl/rejected": (policy.rejected - reference.rejected).detach().mean(),
        }
        if policy.toxic is not None:
            m["logps/toxic"] = policy.toxic.detach().mean()
            m["kl/toxic"] = (policy.toxic - reference.toxic).detach().mean()  # vs pi_t (A.3)
            if out.toxic_rewards is not None:
                m["rewards/toxic"] = out.toxic_rewards.mean()
        on_step = split == "train"
        bs = policy.chosen.numel()
        kw = dict(
            on_step=on_step, on_epoch=True, batch_size=bs, sync_dist=not on_step
        )  # DDP: all ranks
        self.log_dict({f"{split}/{k}": v for k, v in m.items()}, **kw)
        self.log(f"{split}/loss", loss.detach(), prog_bar=True, **kw)

    def summarize(self, datamodule, out_dir) -> dict[str, float]:
        if self.trainer.is_global_zero:
            plot_kl({"this run": self.history}, Path(out_dir) / "kl.png")
        return {}


def _stop_check() -> None:
    """Between reference batches: honour a pending stop/requeue signal (safealign.stop)."""
    try:
        from safealign import stop
    except ImportError:  # pragma: no cover - older checkouts
        return
    stop.check("reference precompute")
