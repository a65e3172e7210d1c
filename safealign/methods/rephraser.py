"""RephraserModule: ISAAC's seq2seq rephraser trained on multi-target pseudo responses (B.3).

Loss (ISAAC Eq. 3, METHODS.md B.5): for each (u, r), the mean over its M pseudo targets of the
per-target mean token cross-entropy, padding masked with -100. The authors' chitchat code sums
over M and trains on pad tokens (labels not masked); both are noted deviations (B.5).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from safealign.data.collate import IGNORE
from safealign.eval.scorers import ProfanityScorer
from safealign.io import write_jsonl
from safealign.isaac.rephrase import rewrite
from safealign.methods.base import BaseModule
from safealign.sharding import is_sharded
from safealign.types import SAFE, UNSAFE, MultiTargetExample

log = logging.getLogger(__name__)


def seq2seq_multi_target_loss(logits: Tensor, labels: Tensor, n_targets: int) -> Tensor:
    """Per-context mean over M targets of the mean token NLL (Eq. 3; B.5: average, pads -100).

    Unlike a causal LM there is no shift: decoder position t predicts labels[t]. A target with
    no unmasked token is left out of its context's mean.

    Args:
        logits: Shape: (B * M, T, V), rows grouped M consecutive targets per context.
        labels: Shape: (B * M, T), -100 on padding.
        n_targets: M.

    Returns:
        Shape: (B,).
    """
    rows = logits.shape[0]
    if n_targets < 1 or rows % n_targets:
        raise ValueError(f"{rows} rows cannot be grouped into contexts of {n_targets} targets")
    nll = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
    )
    mask = labels != IGNORE  # (B*M, T)
    per_target = (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B*M,)
    has_tokens = mask.any(-1).to(per_target.dtype)
    per_target, has_tokens = per_target.view(-1, n_targets), has_tokens.view(-1, n_targets)
    return (per_target * has_tokens).sum(-1) / has_tokens.sum(-1).clamp(min=1)


class RephraserModule(BaseModule):
    """Args (beyond BaseModule): generation: rewrite() settings for the end-of-run samples
    (B.3: greedy, max_length 256, repetition_penalty 2.5, no_repeat_ngram_size 3);
    summary_rows: held-out dialogues rewritten at the end of the run (rewrites.jsonl)."""

    record_type = MultiTargetExample

    def __init__(
        self,
        model_factory: Callable,
        tokenizer,
        optimizer: Callable,
        scheduler=None,
        generation: dict | None = None,
        summary_rows: int = 64,
    ) -> None:
        super().__init__(model_factory, tokenizer, optimizer, scheduler)
        self.generation, self.summary_rows = dict(generation or {}), summary_rows

    def per_example_loss(self, batch: dict) -> Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        m = int(batch["n_targets"])
        # Encode each source once and reuse it for its M targets (same maths as M copies).
        encoder_out = self.model.get_encoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        hidden = encoder_out.last_hidden_state.repeat_interleave(m, dim=0)  # (B*M, S, d)
        mask = batch["attention_mask"].repeat_interleave(m, dim=0)
        decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        logits = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
        ).logits  # (B*M, T, V)
        return seq2seq_multi_target_loss(logits, batch["labels"], m)  # (B,)

    def _step(self, batch: dict, split: str, batch_idx: int) -> Tensor:
        loss = self.per_example_loss(batch).mean()
        self.check_finite(loss, batch, batch_idx)
        bs = batch["index"].numel()
        self.log(
            f"{split}/loss",
            loss,
            prog_bar=True,
            batch_size=bs,
            on_step=split == "train",
            on_epoch=True,
        )
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test", batch_idx)

    def summarize(self, datamodule, out_dir) -> dict[str, float]:
        """Rewrite held-out responses: how often they change and their profanity score before and
        after, overall and per ground-truth label when known (written to rewrites.jsonl)."""
        if not hasattr(datamodule, "held_out") or self.summary_rows < 1:
            return {}
        if is_sharded(self.model):  # sampled lengths may differ per rank: collectives would hang
            log.warning("rewrite summary skipped: the model is sharded; run evaluate.py on the export")
            return {}
        rows = datamodule.held_out(self.summary_rows)
        if not rows:
            return {}
        contexts, responses, labels = (list(x) for x in zip(*rows, strict=True))
        res = rewrite(self.model, self.tokenizer, contexts, responses, **self.generation)
        changed = [
            new.strip() != old.strip() for new, old in zip(res.responses, responses, strict=True)
        ]
        cols = zip(contexts, responses, res.responses, labels, changed, strict=True)
        write_jsonl(
            Path(out_dir) / "rewrites.jsonl",
            [
                {"context": c, "response": r, "rewrite": n, "label": lab, "changed": ch}
                for c, r, n, lab, ch in cols
            ],
        )
        out = {"rewrite/n": float(len(rows)), "rewrite/changed_rate": sum(changed) / len(rows)}
        # Offline safety proxy (alt-profanity-check): P(offensive) before and after rewriting.
        before, after = (ProfanityScorer().score(x) for x in (responses, res.responses))
        out["rewrite/profanity/before"], out["rewrite/profanity/after"] = (
            before.mean(),
            after.mean(),
        )
        for label in (SAFE, UNSAFE):
            sel = np.array([lab == label for lab in labels])
            if sel.any():
                out[f"rewrite/changed_rate/{label}"] = float(np.mean(np.array(changed)[sel]))
                out[f"rewrite/profanity/{label}/before"] = float(before[sel].mean())
                out[f"rewrite/profanity/{label}/after"] = float(after[sel].mean())
        return {k: float(v) for k, v in out.items()}
