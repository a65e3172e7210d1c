"""Canonical record types. Every loader converts to these; nothing downstream knows a source format.

Prompt convention (one, used everywhere): ``context`` is the full prompt text exactly as the model
sees it, in the HH-RLHF transcript form ``"\\n\\nHuman: ...\\n\\nAssistant:"`` (multi-turn contexts keep
all earlier turns); ``response`` is the completion that follows it, starting with a space. Use
:func:`chat_prompt` to build a context from plain turns.

Also the typed values methods exchange: per-sequence log-probs (:class:`SeqLogps`), loss outputs
(:class:`LossOut`) and the preference batch the collator builds (:class:`PreferenceBatch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from torch import Tensor

HUMAN_TAG = "\n\nHuman:"
ASSISTANT_TAG = "\n\nAssistant:"

# Ground-truth labels. "unknown" is for corpora without safety labels (HH-RLHF, MultiWOZ).
SAFE, UNSAFE, EVASIVE, UNKNOWN = "safe", "unsafe", "evasive", "unknown"
LABELS = (SAFE, UNSAFE, EVASIVE, UNKNOWN)


def chat_prompt(turns: list[str]) -> str:
    """Format alternating user/assistant turns (user first) as a prompt ending with the assistant tag."""
    parts = []
    for i, text in enumerate(turns):
        tag = HUMAN_TAG if i % 2 == 0 else ASSISTANT_TAG
        parts.append(f"{tag} {text.strip()}")
    return "".join(parts) + ASSISTANT_TAG


def as_response(text: str) -> str:
    """Normalise a completion to the convention: one leading space, no trailing whitespace."""
    return " " + text.strip()


@dataclass(frozen=True)
class DialogueExample:
    """One (context, response) pair with its hidden safety label."""

    context: str
    response: str
    label: str = UNKNOWN
    topic: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class PreferenceExample:
    """A preference triple: chosen y_w, rejected y_l and (ADPO) toxic y_t for one prompt x."""

    prompt: str
    chosen: str
    rejected: str
    toxic: str | None = None
    source: str = ""


@dataclass(frozen=True)
class MultiTargetExample:
    """ISAAC multi-target record: one context with M pseudo responses (docs/methods.md B.2 step 10)."""

    context: str
    targets: tuple[str, ...]
    original: str = ""


@dataclass
class Corpus:
    """What a data source yields: dialogues (SFT/ISAAC) and/or preference triples (DPO/ADPO), per split."""

    train: list = field(default_factory=list)
    val: list = field(default_factory=list)
    test: list = field(default_factory=list)
    name: str = ""
    dropped: dict = field(default_factory=dict)  # reason -> count, logged by the data module


class SeqLogps(NamedTuple):
    """Per-sequence summed log-probs, each Shape: (B,). ``toxic`` is None for two-way (DPO) batches."""

    chosen: Tensor
    rejected: Tensor
    toxic: Tensor | None = None


class LossOut(NamedTuple):
    """Per-example loss and implicit rewards, each Shape: (B,). No reduction inside a loss."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    toxic_rewards: Tensor | None = None


class Rows(NamedTuple):
    """Right-padded token rows, each Shape: (N, T); ``labels`` is -100 on prompt and padding."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor


class PreferenceBatch(NamedTuple):
    """One preference batch (docs/methods.md A.4, C.2), from ``PreferenceCollator``.

    ``input_ids``/``attention_mask``/``labels`` stack [chosen; rejected(; toxic)] blocks of B rows
    each, Shape: (n_way * B, T), for ONE concatenated forward. ``index`` holds the examples'
    positions in their split, Shape: (B,). ``toxic_ctx`` (ADPO) is the toxic response after
    prompt + [TOXIC], Shape: (B, T'), scored only as pi_t (A.3); None for DPO. A NamedTuple, so
    Lightning's batch transfer (``apply_to_collection``) moves every tensor, nested ones too.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    index: Tensor
    toxic_ctx: Rows | None = None

    @property
    def n_way(self) -> int:
        """2 ([chosen; rejected], DPO) or 3 ([chosen; rejected; toxic], ADPO)."""
        return self.input_ids.shape[0] // self.index.numel()

    def chosen_rejected(self) -> Rows:
        """The first 2B rows: the pairs a reference scores (pi_t scores ``toxic_ctx`` instead)."""
        n = 2 * self.index.numel()
        return Rows(self.input_ids[:n], self.attention_mask[:n], self.labels[:n])

    def token_count(self) -> int:
        """Non-pad tokens the model reads: every row, toxic context included."""
        ctx = 0 if self.toxic_ctx is None else int(self.toxic_ctx.attention_mask.sum())
        return int(self.attention_mask.sum()) + ctx
