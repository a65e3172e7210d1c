"""RephraserModule: ISAAC's seq2seq rephraser trained on multi-target pseudo responses (B.3).

Loss: :func:`safealign.losses.seq2seq_multi_target_loss` (ISAAC Eq. 3, docs/methods.md B.5); the
step, NaN guard and logging are BaseModule's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import Tensor

from safealign.eval.scorers import ProfanityScorer
from safealign.io import write_jsonl
from safealign.isaac.rephrase import rewrite
from safealign.losses import seq2seq_multi_target_loss
from safealign.methods.base import BaseModule
from safealign.sharding import is_sharded
from safealign.types import SAFE, UNSAFE, MultiTargetExample

log = logging.getLogger(__name__)


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
