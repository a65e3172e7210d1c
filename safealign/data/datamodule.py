"""One LightningDataModule for every method: the record type decides the encoding and collator.

Loading and validating the data happens in __init__ (at `instantiate(cfg.data)`), i.e. before a
tokenizer or model is built, so bad input fails fast. Tokenisation happens in `attach`, once the
tokenizer exists; the method module says which record type it needs.

Data hygiene (issue 14), reported as `data: <key> = <n>` with the encoding counts: rows whose
prompt is empty are dropped in every split (evaluation rejects them too), exact duplicate train
rows are counted and kept, and validation rows that also occur in train are counted and, with
`dedup_val` (on in conf/data), removed: a held-out loss on training rows is not held out.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

from safealign.data.collate import (
    Encoded,
    MultiTargetCollator,
    PreferenceCollator,
    SFTCollator,
    check_lengths,
    encode,
)
from safealign.data.control import check_placement, check_recall, is_marked
from safealign.data.loader import ResumableDataLoader
from safealign.errors import ConfigError
from safealign.types import (
    ASSISTANT_TAG,
    HUMAN_TAG,
    UNSAFE,
    Corpus,
    DialogueExample,
    MultiTargetExample,
    PreferenceExample,
)

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def prompt_of(r) -> str:
    return r.prompt if isinstance(r, PreferenceExample) else r.context


def is_blank_prompt(prompt: str) -> bool:
    """True when a prompt holds nothing but chat tags and whitespace: an empty context converts
    to ``"\\n\\nHuman: \\n\\nAssistant:"`` (types.chat_prompt), which is not blank as a string."""
    return not prompt.replace(HUMAN_TAG, "").replace(ASSISTANT_TAG, "").strip()


def overlap_counts(train: list, val: list, test: list) -> dict[str, int]:
    """Exact-duplicate counts (records compare by value): repeats within train, and val/test rows
    that also occur in train."""
    seen = set(train)
    return {
        "duplicate_train_rows": len(train) - len(seen),
        "val_overlap_with_train": sum(r in seen for r in val),
        "test_overlap_with_train": sum(r in seen for r in test),
    }


class DataModule(L.LightningDataModule):
    """Args:
    source: a Corpus, or a zero-argument callable returning one (a Hydra `_partial_` loader).
    toxic_control: SFT only: dialogues labelled unsafe get `[TOXIC]` in the context (ADPO A.1).
    control_placement: where `[TOXIC]` goes (see safealign.data.control.PLACEMENTS).
    control_recall: share of unsafe dialogues that get `[TOXIC]` (a seeded per-dialogue draw,
        safealign.data.control.is_marked); the rest stay unmarked, as unlabelled harm in real
        data does. 1.0 (default) marks all; conf/data/builtin.yaml lowers it (docs/methods.md A.1).
    val_fraction: when the source has no validation split, hold out this seeded fraction of train.
    dedup_val: remove validation rows that also occur (exactly) in train; counted either way.
        On in the training configs (conf/data/*.yaml); off here so a caller-built corpus (and
        the classifier's published DiaSafety val split) is kept as given, with a warning.
    """

    def __init__(
        self,
        source: Corpus | Callable[[], Corpus],
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        max_prompt_length: int = 64,
        max_length: int = 128,
        toxic_control: bool = False,
        control_placement: str = "end",
        control_recall: float = 1.0,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.0,
        dedup_val: bool = False,
    ) -> None:
        super().__init__()
        check_lengths(max_prompt_length, max_length)
        check_placement(control_placement)
        self.control_recall = check_recall(control_recall)
        if batch_size < 1:
            raise ConfigError("data.batch_size", f"must be >= 1, got {batch_size}")
        self.stats: Counter = Counter()
        self.corpus = source() if callable(source) else source
        self._drop_empty_prompts()
        if not self.corpus.train:
            raise ConfigError(
                "data.source",
                f"corpus {self.corpus.name!r} has no training records ({self.drop_summary()})",
            )
        if not self.corpus.val and val_fraction > 0:
            self._split_off_val(val_fraction, seed)
        self._check_overlap(dedup_val)
        for reason, n in sorted(self.corpus.dropped.items()):
            log.info("data: dropped %d rows (%s) from %s", n, reason, self.corpus.name)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_prompt_length, self.max_length = max_prompt_length, max_length
        self.toxic_control, self.control_placement = toxic_control, control_placement
        self.num_workers, self.seed = num_workers, seed
        self.encoded: dict[str, list] = {}

    def _drop_empty_prompts(self) -> None:
        for split in SPLITS:
            records = getattr(self.corpus, split)
            kept = [r for r in records if not is_blank_prompt(prompt_of(r))]
            self.stats["dropped_empty_prompt"] += len(records) - len(kept)
            setattr(self.corpus, split, kept)

    def _check_overlap(self, dedup_val: bool) -> None:
        self.stats.update(overlap_counts(self.corpus.train, self.corpus.val, self.corpus.test))
        n = self.stats["val_overlap_with_train"]
        if n and not dedup_val:
            log.warning(
                "data: %d validation rows of %s are also train rows (kept: dedup_val is off)",
                n,
                self.corpus.name,
            )
        elif n:
            seen = set(self.corpus.train)
            self.corpus.val = [r for r in self.corpus.val if r not in seen]
            if not self.corpus.val:
                log.warning(
                    "data: every validation row of %s is also a train row: "
                    "no validation split left (data.dedup_val=false keeps them)",
                    self.corpus.name,
                )

    def drop_summary(self) -> str:
        """Every drop so far, by reason, from the loader (``Corpus.dropped``) and this module."""
        mine = {k.removeprefix("dropped_"): n for k, n in self.stats.items() if "dropped_" in k}
        drops = +(Counter(self.corpus.dropped) + Counter(mine))  # unary +: no zero counts
        if not drops:
            return "the source yielded no rows"
        return "dropped: " + ", ".join(f"{k}={n}" for k, n in sorted(drops.items()))

    def _split_off_val(self, fraction: float, seed: int) -> None:
        """Single-split sources (e.g. one HH file): a seeded, reproducible held-out slice."""
        if not 0 < fraction < 1:
            raise ConfigError("data.val_fraction", f"must be in (0, 1), got {fraction}")
        order = torch.randperm(len(self.corpus.train), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(fraction * len(order))))
        train = self.corpus.train
        self.corpus.val = [train[i] for i in order[:n_val].tolist()]
        self.corpus.train = [train[i] for i in sorted(order[n_val:].tolist())]

    @property
    def record_type(self) -> type:
        return type(self.corpus.train[0])

    def texts(self) -> list[str]:
        """All training text, for training the tokenizer (never val/test)."""
        out: list[str] = []
        for r in self.corpus.train:
            if isinstance(r, DialogueExample):
                out += [r.context, r.response]
            elif isinstance(r, PreferenceExample):
                out += [r.prompt, r.chosen, r.rejected] + ([r.toxic] if r.toxic else [])
            else:
                out += [r.context, *r.targets]
        return out

    def attach(self, tokenizer, record_type: type, needs_toxic: bool = False) -> None:
        """Tokenise every split for a method that consumes `record_type` records."""
        if self.record_type is not record_type:
            raise ConfigError(
                "data",
                f"this method trains on {record_type.__name__} records but data source "
                f"{self.corpus.name!r} yields {self.record_type.__name__}; pick a matching data= option",
            )
        self.tokenizer, self.needs_toxic = tokenizer, needs_toxic
        for split in SPLITS:
            records = getattr(self.corpus, split)
            self.encoded[split] = [e for e in (self._encode(r) for r in records) if e is not None]
        for k, v in sorted(self.stats.items()):
            log.info("data: %s = %d", k, v)
        if not self.encoded["train"]:
            raise ConfigError(
                "data", f"no training example survived encoding ({self.drop_summary()})"
            )

    def _enc(self, prompt: str, response: str, toxic: bool = False) -> Encoded:
        # [TOXIC] goes in at encoding: with a chat template it sits inside a message (chat.py)
        placement = self.control_placement if toxic else None
        e = encode(
            self.tokenizer, prompt, response, self.max_prompt_length, self.max_length, placement
        )
        self.stats["truncated"] += e.truncated
        return e

    def _encode(self, r):
        if isinstance(r, DialogueExample):
            ctrl = self.toxic_control and r.label == UNSAFE
            if ctrl and not is_marked(r.context, r.response, self.control_recall, self.seed):
                ctrl = False
                self.stats["unsafe_left_unmarked"] += 1
            self.stats["with_control_token"] += ctrl
            return self._enc(r.context, r.response, toxic=ctrl)
        if isinstance(r, MultiTargetExample):
            return [self._enc(r.context, t) for t in r.targets]
        return self._encode_preference(r)

    def _encode_preference(self, r: PreferenceExample) -> dict[str, Encoded] | None:
        # Documented policy (issue 3, "Bad input"): drop with a count, never crash in the forward.
        if not r.chosen.strip() or not r.rejected.strip():
            self.stats["dropped_empty_response"] += 1
            return None
        if r.chosen.strip() == r.rejected.strip():
            self.stats["dropped_identical_pair"] += 1
            return None
        if self.needs_toxic and not (r.toxic or "").strip():
            self.stats["dropped_missing_toxic"] += 1
            return None
        out = {"chosen": self._enc(r.prompt, r.chosen), "rejected": self._enc(r.prompt, r.rejected)}
        if self.needs_toxic:
            out["toxic"] = self._enc(r.prompt, r.toxic)  # pi_theta(y_t | x): no token (A.3)
            out["toxic_ctx"] = self._enc(r.prompt, r.toxic, toxic=True)  # pi_t(y_t|x⊕[TOXIC]) (A.3)
        return out

    def collator(self) -> Callable[[list], Any]:
        """Turns a list of :meth:`indexed_rows` items into a batch (a PreferenceBatch for
        preference records, a dict of tensors otherwise)."""
        pad_id = self.tokenizer.pad_token_id
        if self.record_type is PreferenceExample:
            return PreferenceCollator(pad_id)
        if self.record_type is MultiTargetExample:
            return MultiTargetCollator(pad_id)
        return SFTCollator(pad_id)

    def encoded_splits(self) -> dict[str, list]:
        """Every split's encoded rows (after :meth:`attach`), e.g. to key a cache by content."""
        return {split: list(rows) for split, rows in self.encoded.items()}

    def indexed_rows(self, split: str) -> list[tuple[int, Any]]:
        """(index, encoded row) pairs of a split, index = position in the split: the items every
        loader batches and a batch's ``index`` refers to (e.g. reference precompute)."""
        return list(enumerate(self.encoded.get(split, [])))

    def batch_size_for(self, split: str) -> int:
        return self.batch_size if split == "train" else self.eval_batch_size

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)  # randomness passed in, not global
        # train: resumable mid-epoch with the exact batch order (safealign.data.loader)
        loader_cls = ResumableDataLoader if split == "train" else DataLoader
        return loader_cls(
            self.indexed_rows(split),
            batch_size=self.batch_size_for(split),
            shuffle=shuffle,
            generator=gen,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
