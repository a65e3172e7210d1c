"""Tokenisation and padding. Prompt labels are -100; one documented truncation policy.

Truncation (TRL's "keep_end" for prompts, docs/methods.md C.1): the prompt keeps its LAST
`max_prompt_length` tokens (the most recent turns matter most); the response then keeps its FIRST
`max_length - len(prompt)` tokens, EOS included when it fits. Chosen, rejected and toxic are
truncated by the same rule, each on its own (a known TRL/LLaMA-Factory bug is to forget one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safealign.data.chat import prompt_ids, render_prompt, response_ids
from safealign.errors import ConfigError
from safealign.types import PreferenceBatch, Rows

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def check_lengths(max_prompt_length: int, max_length: int) -> None:
    if not 0 < max_prompt_length < max_length:
        raise ConfigError(
            "data.max_prompt_length",
            f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}",
        )


def encode(
    tokenizer,
    prompt: str,
    response: str,
    max_prompt_length: int,
    max_length: int,
    placement: str | None = None,
) -> Encoded:
    """prompt ⊕ response ⊕ EOS with labels -100 on the prompt. Tokenised separately, so a
    BPE merge can never straddle the prompt/response boundary and shift the mask.

    The prompt is rendered by :func:`safealign.data.chat.render_prompt` (the tokenizer's chat
    template if it has one, ``[TOXIC]`` at ``placement`` unless None); see safealign/data/chat.py
    for BOS and the templated response's end token."""
    p = prompt_ids(tokenizer, render_prompt(tokenizer, prompt, placement))
    r = response_ids(tokenizer, prompt, response, placement)
    truncated = len(p) > max_prompt_length
    p = p[-max_prompt_length:]
    room = max_length - len(p)
    truncated = truncated or len(r) > room
    r = r[:room]
    return Encoded(p + r, [IGNORE] * len(p) + r, truncated)


def pad(rows: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    """Right-pad to the longest row (or `length`). Shape: (N, T)."""
    t = length or max(len(r) for r in rows)
    out = torch.full((len(rows), t), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def stack(encoded: list[Encoded], pad_id: int, length: int | None = None) -> Rows:
    ids = pad([e.input_ids for e in encoded], pad_id, length)
    labels = pad([e.labels for e in encoded], IGNORE, length)
    mask = pad([[1] * len(e.input_ids) for e in encoded], 0, length)
    return Rows(ids, mask, labels)


def _index(items: list[tuple[int, object]]) -> torch.Tensor:
    return torch.tensor([i for i, _ in items], dtype=torch.long)  # (B,)


@dataclass
class SFTCollator:
    """Batch of prompt ⊕ response rows. Item: (index, Encoded)."""

    pad_id: int

    def __call__(self, items: list[tuple[int, Encoded]]) -> dict[str, torch.Tensor]:
        rows = stack([e for _, e in items], self.pad_id)
        return {**rows._asdict(), "index": _index(items)}


@dataclass
class MultiTargetCollator:
    """ISAAC (Eq. 3): each context with its M targets as M rows. Item: (index, list[Encoded])."""

    pad_id: int

    def __call__(self, items: list[tuple[int, list[Encoded]]]) -> dict[str, torch.Tensor]:
        rows = stack([e for _, group in items for e in group], self.pad_id)
        n_targets = torch.tensor(len(items[0][1]), dtype=torch.long)
        return {**rows._asdict(), "index": _index(items), "n_targets": n_targets}


@dataclass
class PreferenceCollator:
    """[chosen; rejected(; toxic)] stacked along the batch for ONE concatenated forward
    (docs/methods.md A.4, C.2), padded to a common length. For ADPO also emits the toxic response after
    prompt ⊕ [TOXIC] (``toxic_ctx``), scored only by the inner toxic model pi_t (A.3).

    Item: (index, {"chosen": Encoded, "rejected": Encoded[, "toxic": Encoded, "toxic_ctx": Encoded]}).
    """

    pad_id: int

    def __call__(self, items: list[tuple[int, dict[str, Encoded]]]) -> PreferenceBatch:
        fields = ["chosen", "rejected"] + (["toxic"] if "toxic" in items[0][1] else [])
        rows = stack([enc[f] for f in fields for _, enc in items], self.pad_id)
        ctx = None
        if "toxic_ctx" in items[0][1]:
            ctx = stack([enc["toxic_ctx"] for _, enc in items], self.pad_id)
        return PreferenceBatch(*rows, index=_index(items), toxic_ctx=ctx)
