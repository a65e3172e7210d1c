"""SFTModule: supervised fine-tuning (ADPO stage 1 with `[TOXIC]`) and ISAAC multi-target training."""

from __future__ import annotations

import torch

from safealign.losses import multi_target_loss, sft_loss
from safealign.methods.base import BaseModule
from safealign.methods.diagnostics import control_token_shift
from safealign.types import DialogueExample, MultiTargetExample


class SFTModule(BaseModule):
    """Next-token NLL on responses; prompt tokens are masked with -100 by the collator."""

    record_type = DialogueExample

    def per_example_loss(self, batch: dict) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sft_loss(logits, batch["labels"])  # (B,)

    def _step(self, batch: dict, split: str, batch_idx: int) -> torch.Tensor:
        loss = super()._step(batch, split, batch_idx)
        if split != "train":
            self.log_split(split, {"ppl": loss.exp()}, batch_size=batch["index"].numel())
        return loss

    def summarize(self, datamodule, out_dir) -> dict[str, float]:
        """Control-token shift on held-out labelled dialogues (ADPO A.1), when there are labels."""
        held_out = datamodule.corpus.val + datamodule.corpus.test
        if not held_out or not isinstance(held_out[0], DialogueExample):
            return {}
        return control_token_shift(
            self.model, self.tokenizer, held_out, datamodule.control_placement,
            datamodule.max_prompt_length, datamodule.max_length,
        )


class MultiTargetModule(SFTModule):
    """ISAAC (Eq. 3): each context is trained toward its M pseudo responses, loss averaged over M."""

    record_type = MultiTargetExample

    def per_example_loss(self, batch: dict) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return multi_target_loss(logits, batch["labels"], int(batch["n_targets"]))  # (B,)
