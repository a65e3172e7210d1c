"""The drop policy: which rows are dropped instead of failing the run, and where they are counted.

A converter returns a record, or one of these reasons;
:func:`safealign.data.converters.convert_rows` counts them and :func:`add_records` adds them to ``Corpus.dropped`` (reason -> count, logged by
the data module). Nothing else drops rows while loading.

- ``prompt_mismatch``: the two transcripts' prompts differ, so the pair does not compare two
  replies to one context (5 of the 2,312 real harmless-base test rows);
- ``empty_response``: a blank chosen/rejected/toxic reply or dialogue response (4 real HH rows;
  3 real DiaSafety rows: 2 train, 1 test; DiaSafety keeps them with ``drop_empty=False``);
- ``identical_pair``: chosen == rejected after normalisation (none in the real HH test split).

Two wrappers drop rows on purpose and count them the same way (``Corpus.dropped``):
``duplicate_dialogue`` (:mod:`safealign.data.labeller`: a transcript already read from the other
side of a pair) and ``unsafe_subsampled`` (:mod:`safealign.data.diasafety_levels`: DiaSafety-S/M/H).

Kept on purpose: the one duplicated DiaSafety train row (same context, response and label), so
the published split sizes stay exact apart from the documented drops.
"""

from __future__ import annotations

from collections import Counter

from safealign.types import Corpus

PROMPT_MISMATCH = "prompt_mismatch"
EMPTY_RESPONSE = "empty_response"
IDENTICAL_PAIR = "identical_pair"


def empty_response(*texts: str) -> str | None:
    """``empty_response`` when any reply is blank (whitespace only), else None."""
    return EMPTY_RESPONSE if any(not t.strip() for t in texts) else None


def add_records(corpus: Corpus, split: str, records: list, dropped: dict[str, int]) -> None:
    """Append one file's (or hub split's) records to ``split`` and add its drop counts."""
    getattr(corpus, split).extend(records)
    corpus.dropped = dict(Counter(corpus.dropped) + Counter(dropped))
