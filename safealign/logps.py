"""Per-sequence log-probs: one helper, one concatenated forward (STYLE.md principle 2).

Follows the DPO reference `_get_batch_logps` and TRL (METHODS.md C.1): logits at t predict token
t+1, positions whose label is -100 (prompt, padding) are masked, per-token log-probs are summed
(or averaged, the IPO convention).
"""

from __future__ import annotations

import torch
from torch import Tensor

from safealign.types import SeqLogps

IGNORE = -100


def sequence_logps(logits: Tensor, labels: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean) of log p(label_t | <t) over unmasked positions.

    Args:
        logits: Shape: (B, T, V).
        labels: Shape: (B, T), -100 where ignored.
        average: mean over unmasked tokens instead of sum.

    Returns:
        Shape: (B,).
    """
    logits = logits[:, :-1, :]  # (B, T-1, V): position t predicts t+1
    labels = labels[:, 1:]
    mask = labels != IGNORE
    safe_labels = labels.masked_fill(~mask, 0)
    # log_softmax gathered at the label: avoids materialising a second (B, T, V) float tensor
    # beyond the log-softmax itself; float32 for stability under bf16 autocast.
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe_labels.unsqueeze(-1))
    token_logps = token_logps.squeeze(-1) * mask
    total = token_logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def concatenated_forward(
    model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, n_way: int, average: bool = False
) -> SeqLogps:
    """One forward over rows stacked [chosen; rejected(; toxic)] (each block B rows).

    Returns SeqLogps with each field Shape: (B,); `toxic` only when n_way == 3.
    """
    if n_way not in (2, 3) or input_ids.shape[0] % n_way:
        raise ValueError(f"batch of {input_ids.shape[0]} rows is not {n_way} equal blocks")
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (nB, T, V)
    logps = sequence_logps(logits, labels, average).chunk(n_way)
    return SeqLogps(logps[0], logps[1], logps[2] if n_way == 3 else None)


def single_forward(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, average: bool = False) -> Tensor:
    """Per-sequence log-probs of one block of rows. Shape: (B,)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return sequence_logps(logits, labels, average)
