"""Safety-classifier data (docs/methods.md B.7): the input string, label ids, encoding and batching.

The ISAAC classifier reads ``"<|user|>" + context + "<|system|>" + response`` with raw text
(no ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"`` wrappers; DiaSafety contexts are one user turn) and
keeps the LAST ``max_length`` tokens. Multi-turn contexts extend the same format turn by turn:
``<|user|>u1<|system|>a1<|user|>u2<|system|>r``. Labels: 1 = unsafe, 0 = safe (B.7); ``evasive``
(a refusal) counts as safe; ``unknown`` rows are dropped with a count.

Training and scoring tokenise with the same call as
:class:`safealign.eval.scorers.HFClassifierScorer` (``truncation_side="left"``, same
``add_special_tokens``), so an exported classifier sees at test time exactly what it trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from safealign.data.chat import dialogue_turns
from safealign.data.collate import pad
from safealign.data.datamodule import DataModule
from safealign.errors import ConfigError
from safealign.types import EVASIVE, SAFE, UNSAFE

USER, SYSTEM = "<|user|>", "<|system|>"
INPUT_TEMPLATE = USER + "{context}" + SYSTEM + "{response}"  # B.7, for HFClassifierScorer
LABEL_IDS = {SAFE: 0, EVASIVE: 0, UNSAFE: 1}


def classifier_context(context: str) -> str:
    """The context part of the B.7 string: turns behind their speaker tags, the leading
    ``<|user|>`` left to the template."""
    text = "".join((USER if who == "user" else SYSTEM) + t for who, t in dialogue_turns(context))
    return text.removeprefix(USER)


def classifier_text(context: str, response: str) -> str:
    """``"<|user|>" + context + "<|system|>" + response`` with raw texts (B.7)."""
    return INPUT_TEMPLATE.format(context=classifier_context(context), response=response.strip())


def label_id(label: str) -> int | None:
    """1 = unsafe, 0 = safe or evasive (B.7); None for unlabelled rows."""
    return LABEL_IDS.get(label)


@dataclass(frozen=True)
class ClsEncoded:
    input_ids: list[int]
    label: int
    truncated: bool


def encode_text(tokenizer, text: str, max_length: int, add_special_tokens: bool) -> ClsEncoded:
    """Tokenise like HFClassifierScorer (the tokenizer's truncation_side must be "left")."""
    # verbose=False: the untruncated pass only measures length (no "longer than max" warning)
    full = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    ids = tokenizer(
        text, truncation=True, max_length=max_length, add_special_tokens=add_special_tokens
    )["input_ids"]
    return ClsEncoded(ids, -1, len(full) > len(ids))


@dataclass
class ClsCollator:
    """Right-padded rows with attention mask and class labels. Item: (index, ClsEncoded)."""

    pad_id: int

    def __call__(self, items: list[tuple[int, ClsEncoded]]) -> dict[str, torch.Tensor]:
        rows = [e.input_ids for _, e in items]
        return {
            "input_ids": pad(rows, self.pad_id),
            "attention_mask": pad([[1] * len(r) for r in rows], 0),
            "labels": torch.tensor([e.label for _, e in items], dtype=torch.long),
            "index": torch.tensor([i for i, _ in items], dtype=torch.long),
        }


class LengthGroupedBatches(BatchSampler):
    """Batches of similar length (as HF Trainer's ``group_by_length``): padding is most of the
    cost of an encoder on short dialogues. Training: a seeded shuffle, sorted by length within
    windows of ``window`` batches, then the batches shuffled; each pass draws anew (seed + pass).
    Evaluation: longest first, no randomness.

    Batches are drawn from the indices ``sampler`` yields (default: every row). It is a
    ``BatchSampler`` with a ``sampler`` argument so that under DDP Lightning rebuilds it around
    its ``DistributedSampler``: each rank then groups its own share (``ceil(N / world)`` rows,
    disjoint up to the ``< world`` rows the sampler repeats to even out), so every rank runs the
    same number of batches and none waits forever in an all-reduce.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        shuffle: bool,
        seed: int,
        window: int = 50,
        sampler: Sampler[int] | Iterable[int] | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(range(len(lengths)) if sampler is None else sampler, batch_size, drop_last)
        self.lengths, self.shuffle = lengths, shuffle
        self.seed, self.window, self.passes = seed, window, 0

    def _chunks(self, order: list[int]) -> list[list[int]]:
        order = sorted(order, key=lambda i: -self.lengths[i])
        chunks = [order[j : j + self.batch_size] for j in range(0, len(order), self.batch_size)]
        return [c for c in chunks if len(c) == self.batch_size] if self.drop_last else chunks

    def __iter__(self):
        rows = list(self.sampler)  # this rank's share under DDP
        if not self.shuffle:
            yield from self._chunks(rows)
            return
        gen = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        n, span = len(rows), self.window * self.batch_size
        order = [rows[i] for i in torch.randperm(n, generator=gen).tolist()]
        batches = [b for s in range(0, n, span) for b in self._chunks(order[s : s + span])]
        yield from (batches[i] for i in torch.randperm(len(batches), generator=gen).tolist())

    def __len__(self) -> int:
        n = len(self.sampler)
        span = self.window * self.batch_size if self.shuffle else max(n, 1)
        whole = math.floor if self.drop_last else math.ceil
        return sum(whole(min(span, n - s) / self.batch_size) for s in range(0, n, span))


class ClassificationDataModule(DataModule):
    """Labelled dialogues as B.7 classifier inputs.

    Args (beyond DataModule's source, batch_size, eval_batch_size, num_workers, seed,
    val_fraction): max_length: tokens kept (the LAST ones, B.7); add_special_tokens: add the
    tokenizer's [CLS]/[SEP] (<s>/</s>); the authors' RoBERTa read none, a BERT-style head pools
    position 0, so [CLS] is kept by default. The scorer must use the same value.
    """

    def __init__(self, source, max_length: int = 128, add_special_tokens: bool = True, **kwargs):
        if max_length < 2:
            raise ConfigError("data.max_length", f"must be >= 2, got {max_length}")
        # The causal-LM prompt budget is unused here; any value below max_length passes the check.
        super().__init__(source=source, max_length=max_length, max_prompt_length=1, **kwargs)
        self.add_special_tokens = add_special_tokens

    def texts(self) -> list[str]:
        return [classifier_text(r.context, r.response) for r in self.corpus.train]

    def attach(self, tokenizer, record_type: type, needs_toxic: bool = False) -> None:
        tokenizer.truncation_side = "left"  # keep the last tokens (B.7), saved with the tokenizer
        super().attach(tokenizer, record_type, needs_toxic)

    def _encode(self, r) -> ClsEncoded | None:
        y = label_id(r.label)
        if y is None:
            self.stats["dropped_unlabelled"] += 1
            return None
        text = classifier_text(r.context, r.response)
        e = encode_text(self.tokenizer, text, self.max_length, self.add_special_tokens)
        self.stats["truncated"] += e.truncated
        self.stats[f"label_{y}"] += 1
        return ClsEncoded(e.input_ids, y, e.truncated)

    def collator(self) -> ClsCollator:
        return ClsCollator(self.tokenizer.pad_token_id)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        items = list(enumerate(self.encoded.get(split, [])))
        bs = self.batch_size if split == "train" else self.eval_batch_size
        batches = LengthGroupedBatches([len(e.input_ids) for _, e in items], bs, shuffle, self.seed)
        return DataLoader(
            items, batch_sampler=batches, collate_fn=self.collator(), num_workers=self.num_workers
        )

    def input_settings(self) -> dict:
        """What a scorer needs to reproduce this encoding (written next to the exported model)."""
        return {
            "input_template": INPUT_TEMPLATE,
            "context_format": "classifier_context (chat tags replaced by <|user|>/<|system|>)",
            "response_format": "stripped",
            "max_length": self.max_length,
            "truncation_side": "left",
            "add_special_tokens": self.add_special_tokens,
            "unsafe_label": LABEL_IDS[UNSAFE],
        }
