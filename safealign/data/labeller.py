"""Preference pairs -> labelled SFT dialogues, for the ``[TOXIC]`` SFT stage on corpora without
safety labels (HH-RLHF; docs/methods.md A.1 "Labelling HH-RLHF", issue 11 item 6).

HH-RLHF has no per-dialogue safety label, so with ``data.toxic_control=true`` the SFT stage never
saw ``[TOXIC]`` and the inner toxic model pi_t was the plain SFT model. Here:

1. BOTH transcripts of every pair become dialogues: the rejected harmless-base replies are where
   most harmful turns are, so an SFT corpus of chosen replies only has little to mark.
   Identical dialogues (same context and reply, from any pairs) are kept once and counted as
   dropped (``duplicate_dialogue``).
2. A :class:`Labeller` (any scorer node + a threshold) scores each dialogue's FINAL assistant
   turn in its context; score >= threshold -> ``unsafe`` (gets ``[TOXIC]`` in the SFT stage),
   else ``safe``; a ``nan`` score ("could not score") leaves the label ``unknown``. These are
   the scorer's labels, not gold ones.
3. A corpus that comes as ONE split (the shared harmless-base test file) is split by a seeded,
   context-disjoint split: every pair of a held-out prompt goes to test (or val), so generation
   prompts (train) and evaluation prompts (test) never share a context.

The counts (pairs, dialogues, unsafe from chosen / from rejected, held-out prompts) are logged
at INFO (the run's log file) and returned by :func:`label_counts` from the records' ``meta``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np

from safealign.data.drops import add_records
from safealign.errors import ConfigError
from safealign.eval.scorers import score_texts
from safealign.types import SAFE, UNKNOWN, UNSAFE, Corpus, DialogueExample, PreferenceExample

log = logging.getLogger(__name__)
KEY = "data.source"  # where the wrapper sits in a data config (init.data.source in a pipeline)
SPLITS = ("train", "val", "test")
DUPLICATE_DIALOGUE = "duplicate_dialogue"
TRANSCRIPTS = ("chosen", "rejected")


class Labeller:
    """Marks a dialogue unsafe when ``scorer`` gives its final assistant turn >= ``threshold``.

    Args:
        scorer: any scorer (``conf/scorer/toxicity/*``): ``score(responses, contexts) -> (N,)``.
        threshold: the cut on the scorer's output (its scale; [0, 1] for the toxicity scorers).
    """

    def __init__(self, scorer, threshold: float) -> None:
        if not callable(getattr(scorer, "score", None)):
            raise ConfigError(
                f"{KEY}.labeller.scorer", f"expected a scorer node with score(), got {scorer!r:.80}"
            )
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ConfigError(f"{KEY}.labeller.threshold", f"expected a number, got {threshold!r}")
        if not math.isfinite(threshold):
            raise ConfigError(f"{KEY}.labeller.threshold", f"must be finite, got {threshold}")
        self.scorer, self.threshold = scorer, float(threshold)
        self.name = getattr(scorer, "name", type(scorer).__name__)

    def __call__(self, dialogues: list[DialogueExample]) -> list[DialogueExample]:
        """``dialogues`` relabelled, each with its score in ``meta["label_score"]``."""
        scores = score_texts(
            self.scorer, [d.response for d in dialogues], [d.context for d in dialogues]
        )
        return [
            dataclasses.replace(d, label=self.label(s), meta={**d.meta, "label_score": float(s)})
            for d, s in zip(dialogues, scores, strict=True)
        ]

    def label(self, score: float) -> str:
        if math.isnan(score):
            return UNKNOWN
        return UNSAFE if score >= self.threshold else SAFE


def pair_dialogues(pairs: Iterable[PreferenceExample]) -> tuple[list[DialogueExample], int]:
    """Both transcripts of every pair as dialogues (chosen first), identical ones once; returns
    (dialogues, number of duplicates dropped). ``meta["transcript"]`` says which side a dialogue
    came from (its first occurrence)."""
    seen: dict[tuple[str, str], DialogueExample] = {}
    n = 0
    for p in pairs:
        for side in TRANSCRIPTS:
            n += 1
            d = DialogueExample(
                p.prompt, getattr(p, side), UNKNOWN, "", p.source, {"transcript": side}
            )
            seen.setdefault((d.context, d.response), d)
    return list(seen.values()), n - len(seen)


def hold_out(records: list, fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """(kept, held out): a seeded ``fraction`` of the distinct prompts, with EVERY record of a
    held-out prompt (context-disjoint); both lists keep the input order."""
    prompts = list(dict.fromkeys(r.prompt for r in records))
    n = int(round(fraction * len(prompts)))
    held = {prompts[i] for i in rng.permutation(len(prompts))[:n].tolist()}
    return [r for r in records if r.prompt not in held], [r for r in records if r.prompt in held]


def _check_fraction(value: float, key: str) -> float:
    if not 0 <= value < 1:
        raise ConfigError(f"{KEY}.{key}", f"must be in [0, 1), got {value}")
    return value


def _splits(pairs: Corpus, test_fraction: float, val_fraction: float, seed: int) -> dict:
    """The pairs per split. ONE filled split is the pool (train); a missing test and then val
    split is held out of train by prompt (:func:`hold_out`), seeded by ``seed``."""
    splits = {s: list(getattr(pairs, s)) for s in SPLITS}
    filled = [s for s in SPLITS if splits[s]]
    if len(filled) == 1:
        splits = {"train": splits[filled[0]], "val": [], "test": []}
    rng = np.random.default_rng(seed)  # randomness passed in: one generator, fixed order
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if not splits[split] and fraction > 0:
            splits["train"], splits[split] = hold_out(splits["train"], fraction, rng)
    return splits


def label_counts(corpus: Corpus) -> dict[str, int]:
    """Dialogues, and unsafe dialogues by the transcript they came from, over every split."""
    counts: Counter[str] = Counter()
    for split in SPLITS:
        for d in getattr(corpus, split):
            counts["dialogues"] += 1
            if d.label == UNSAFE:
                counts[f"unsafe_from_{d.meta.get('transcript', 'unknown')}"] += 1
    unsafe = {f"unsafe_from_{t}": counts[f"unsafe_from_{t}"] for t in TRANSCRIPTS}
    return {"dialogues": counts["dialogues"], **unsafe}


def labelled_dialogues(
    pairs: Corpus | Callable[[], Corpus],
    labeller: Labeller | None = None,
    test_fraction: float = 0.1,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> Corpus:
    """An SFT corpus from a preference-pair source (any loader with ``as_dialogues=false``):
    both transcripts per pair, labelled by ``labeller`` (None: all ``unknown``).

    Args:
        pairs: a Corpus of PreferenceExample, or a zero-argument loader (Hydra ``_partial_``).
        test_fraction, val_fraction: prompts held out (context-disjoint) for a missing test /
            val split; a single-split source is split into all three.
        seed: the held-out split's seed (the run's ``seed``).
    """
    _check_fraction(test_fraction, "test_fraction")
    _check_fraction(val_fraction, "val_fraction")
    pairs = pairs() if callable(pairs) else pairs
    records = pairs.train + pairs.val + pairs.test
    if records and not all(isinstance(r, PreferenceExample) for r in records):
        raise ConfigError(f"{KEY}.pairs", "expected preference pairs (set as_dialogues: false)")
    corpus = Corpus(name=pairs.name, dropped=dict(pairs.dropped))
    for split, rows in _splits(pairs, test_fraction, val_fraction, seed).items():
        dialogues, duplicates = pair_dialogues(rows)
        if labeller is not None:
            dialogues = labeller(dialogues)
        add_records(
            corpus, split, dialogues, {DUPLICATE_DIALOGUE: duplicates} if duplicates else {}
        )
    _log_counts(corpus, len(records), labeller)
    return corpus


def _log_counts(corpus: Corpus, n_pairs: int, labeller: Labeller | None) -> None:
    counts = label_counts(corpus)
    prompts = {s: len({d.context for d in getattr(corpus, s)}) for s in SPLITS}
    by = "no labeller" if labeller is None else f"{labeller.name} >= {labeller.threshold:g}"
    log.info(
        "%s: %d pairs -> %d dialogues (%d duplicates dropped); prompts train/val/test %s; "
        "labelled unsafe (%s): %d from chosen, %d from rejected",
        corpus.name, n_pairs, counts["dialogues"], corpus.dropped.get(DUPLICATE_DIALOGUE, 0),
        "/".join(str(prompts[s]) for s in SPLITS), by,
        counts["unsafe_from_chosen"], counts["unsafe_from_rejected"],
    )  # fmt: skip
