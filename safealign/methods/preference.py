"""PreferenceModule: DPO and ADPO in one LightningModule; the loss is injected by config.

pi_ref is the frozen initial (SFT) policy; pi_t (ADPO's inner toxic model) is the same frozen
weights conditioned on `[TOXIC]` (docs/methods.md A.1, A.3). By default both are precomputed once from
the initial weights and cached, so training holds ONE model (no frozen copy, nothing for ZeRO-3 to
wrap twice). `method.toxic_ref` (a `_target_`, safealign.methods.toxic_ref) decides whether pi_t
is those frozen weights (FrozenSFT) or the current policy without gradient (PolicyDetached).
Batches are :class:`safealign.types.PreferenceBatch`; the data module's public API supplies the
rows to precompute.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from safealign import stop
from safealign.errors import ConfigError
from safealign.logps import concatenated_forward
from safealign.methods import reference as ref
from safealign.methods.base import BaseModule
from safealign.methods.plots import plot_kl
from safealign.methods.toxic_ref import FrozenSFT, ToxicRef, check_toxic_ref
from safealign.sharding import layout
from safealign.shared_prompt import shared_prompt_forward
from safealign.types import LossOut, PreferenceBatch, PreferenceExample, SeqLogps

log = logging.getLogger(__name__)


class PreferenceModule(BaseModule):
    """Args (beyond BaseModule): loss: `loss(policy, reference) -> LossOut` (a `_partial_` from
    safealign.losses); needs_toxic: batches carry [chosen; rejected; toxic] (ADPO);
    toxic_ref: where pi_t comes from (safealign.methods.toxic_ref; None = FrozenSFT);
    precompute_reference: cache reference logps once (default) instead of a frozen model;
    reference_batch_size: pairs per forward of that precompute (no grad, so it can exceed the
    training batch; None = the data module's batch sizes);
    average_logps: mean instead of sum per sequence (IPO convention);
    shared_prompt: run each pair's prompt once and continue chosen/rejected(/toxic) from it
    (safealign.shared_prompt; same values to float rounding, issue 12); false = one full row
    per response (safealign.logps.concatenated_forward)."""

    record_type = PreferenceExample

    def __init__(
        self,
        model_factory: Callable,
        tokenizer,
        optimizer: Callable,
        loss: Callable[[SeqLogps, SeqLogps], LossOut],
        scheduler: Callable | None = None,
        needs_toxic: bool = False,
        toxic_ref: ToxicRef | None = None,
        precompute_reference: bool = True,
        average_logps: bool = False,
        cache_dir: str | None = None,
        reference_batch_size: int | None = None,
        shared_prompt: bool = True,
    ) -> None:
        super().__init__(model_factory, tokenizer, optimizer, scheduler)
        self.toxic_ref = check_toxic_ref(FrozenSFT() if toxic_ref is None else toxic_ref)
        self.loss_fn, self.needs_toxic = loss, needs_toxic
        self.shared_prompt = shared_prompt
        self.pair_forward = shared_prompt_forward if shared_prompt else concatenated_forward
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
        encoded = dm.encoded_splits()
        key = ref.reference_key(
            self.model, self.tokenizer, encoded, self.average, self.needs_toxic,
            source=ref.source_identity(self.model_factory), precision=str(trainer.precision),
            shared_prompt=self.shared_prompt,
        )  # fmt: skip
        sizes = {s: len(rows) for s, rows in encoded.items()}
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
        on_batch = functools.partial(stop.check, "reference precompute")  # honour a stop signal
        for split, n in sizes.items():
            if not n:
                continue
            bs = self.reference_batch_size or dm.batch_size_for(split)
            cache[split] = ref.sharded_reference(
                self.model, dm.indexed_rows(split), collate, bs, self.average, device, ctx, on_batch,
                self.pair_forward,
            )
        return cache

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.precompute and self.ref_cache is None:
            self.ref_cache = self._load_or_compute_reference()
            self.model.train()
        if self.reference is not None:  # not a submodule, so the strategy does not move it
            self.reference[0].to(self.device)

    @torch.no_grad()
    def reference_logps(self, batch: PreferenceBatch, split: str) -> SeqLogps:
        """pi_ref on chosen/rejected and, for a three-way batch, pi_t as ``toxic_ref`` picks it
        (A.3). Each field Shape: (B,)."""
        pairs = self._frozen_pairs(batch, split)
        if batch.n_way == 2:
            return pairs
        frozen = functools.partial(self._frozen_pi_t, batch, split)
        policy = functools.partial(ref.pi_t_logps, self.model, batch, self.average)
        return pairs._replace(toxic=self.toxic_ref(frozen, policy))

    def _frozen_pairs(self, batch: PreferenceBatch, split: str) -> SeqLogps:
        if self.ref_cache is None:  # the frozen copy, on the fly
            frozen = self.reference[0]
            return self.pair_forward(frozen, *batch.chosen_rejected(), 2, self.average)
        c, idx, dev = self.ref_cache[split], batch.index.cpu(), batch.input_ids.device
        return SeqLogps(c["chosen"][idx].to(dev), c["rejected"][idx].to(dev))

    def _frozen_pi_t(self, batch: PreferenceBatch, split: str) -> torch.Tensor | None:
        if self.ref_cache is None:
            return ref.pi_t_logps(self.reference[0], batch, self.average)
        c = self.ref_cache[split]
        return c["toxic"][batch.index.cpu()].to(batch.input_ids.device) if "toxic" in c else None

    def _step(self, batch: PreferenceBatch, split: str, batch_idx: int) -> torch.Tensor:
        policy = self.pair_forward(
            self.model, batch.input_ids, batch.attention_mask, batch.labels, batch.n_way,
            self.average,
        )  # fmt: skip
        reference = self.reference_logps(batch, split)
        if split == "train" and self.global_step == 0 and self.ref_cache is not None:
            self._check_step0(policy, reference, batch_idx)
        out = self.loss_fn(policy, reference)
        loss = out.losses.mean()
        self.check_finite(loss, batch.index, batch_idx)
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
        gap = max(float((p - r).detach().abs().max()) for p, r in
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
        # TRL names (docs/methods.md C.4) + ADPO extras and kl/* = mean policy-reference log-ratio (A.4).
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
        m["loss"] = loss.detach()  # last, as before: metrics.json keeps its key order
        self.log_split(split, m, batch_size=policy.chosen.numel())

    def summarize(self, datamodule, out_dir) -> dict[str, float]:
        if self.trainer.is_global_zero:
            plot_kl({"this run": self.history}, Path(out_dir) / "kl.png")
        return {}

