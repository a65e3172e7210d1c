"""DiaSafety-S/M/H: DiaSafety train with its unsafe share cut to 0.04 / 0.1 / 0.3.

The ISAAC paper (Sec. 4, Table 1) trains on DiaSafety with "the unsafe response examples in the
training set" reduced to three degrees, Simple (-S), Medium (-M) and Hard (-H), at fractions
0.04, 0.1 and 0.3 (docs/methods.md B.2 "DiaSafety-S/M/H"). The released train split is 46.3%
unsafe, so a level keeps every non-unsafe row and a seeded random subset of the unsafe rows:

    n_unsafe = round(share * n_other / (1 - share))      so that n_unsafe / (n_other + n_unsafe) ~ share

Only the training split is cut (the paper's construction); validation and test stay as released.
Rows keep their original order, so a level is a subsequence of the released file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from safealign.data.sources import load_diasafety
from safealign.errors import ConfigError
from safealign.types import UNSAFE, Corpus

log = logging.getLogger(__name__)

LEVELS = {"S": 0.04, "M": 0.1, "H": 0.3}  # the paper's DiaSafety-S/M/H unsafe shares
KEY = "data.source.unsafe_share"


def check_share(share: Any, key: str = KEY) -> float:
    """The unsafe share as a float in [0, 1); ConfigError naming ``key`` otherwise."""
    if isinstance(share, bool) or not isinstance(share, int | float):
        raise ConfigError(key, f"must be a number in [0, 1) or null, got {share!r}")
    if not (math.isfinite(share) and 0 <= share < 1):
        raise ConfigError(key, f"must be in [0, 1) (1 would leave no safe rows), got {share}")
    return float(share)


def unsafe_share_indices(
    labels: Sequence[str], share: float, seed: int, key: str = KEY
) -> tuple[np.ndarray, dict[str, Any]]:
    """Rows to keep so that the unsafe share is ``share``: all other rows + seeded unsafe ones.

    Args:
        labels: One label per row (``safealign.types`` labels; only "unsafe" is subsampled).
        share: Target unsafe share in [0, 1).
        seed: Seed of the subsample (``numpy.random.default_rng``).
        key: Config key named in errors.

    Returns:
        (sorted row indices, counts): ``rows``, ``other`` (kept non-unsafe rows),
        ``unsafe_released``, ``unsafe_kept``, ``unsafe_dropped``, ``unsafe_share`` (realised)
        and ``unsafe_share_requested``.

    Raises:
        ConfigError: share outside [0, 1), or more unsafe rows needed than exist.
    """
    share = check_share(share, key)
    is_unsafe = np.asarray([lab == UNSAFE for lab in labels], dtype=bool)
    unsafe, other = np.flatnonzero(is_unsafe), np.flatnonzero(~is_unsafe)
    want = math.floor(share * len(other) / (1 - share) + 0.5)  # round half up, no banker's rounding
    if want > len(unsafe) or (share > 0 and len(other) == 0):
        most = len(unsafe) / max(len(labels), 1)
        raise ConfigError(
            key,
            f"an unsafe share of {share} needs {want} unsafe rows beside {len(other)} other rows, "
            f"but the data has {len(unsafe)} (as released its share is {most:.4f}; only cuts "
            "below that are possible)",
        )
    pick = np.random.default_rng(seed).choice(unsafe, size=want, replace=False)
    keep = np.sort(np.concatenate([other, pick]).astype(np.int64))
    stats = {
        "rows": int(len(keep)),
        "other": int(len(other)),
        "unsafe_released": int(len(unsafe)),
        "unsafe_kept": int(want),
        "unsafe_dropped": int(len(unsafe) - want),
        "unsafe_share": want / len(keep) if len(keep) else 0.0,
        "unsafe_share_requested": share,
    }
    return keep, stats


def subsample_unsafe(
    examples: Sequence, share: float, seed: int, key: str = KEY
) -> tuple[list, dict[str, Any]]:
    """``examples`` (records with a ``label``) cut to an unsafe share; returns (kept, counts)."""
    keep, stats = unsafe_share_indices([e.label for e in examples], share, seed, key)
    return [examples[i] for i in keep], stats


def load_diasafety_level(
    path: str | Path,
    split: str = "train",
    drop_empty: bool = True,
    unsafe_share: float | None = None,
    seed: int = 0,
) -> Corpus:
    """:func:`~safealign.data.sources.load_diasafety` with the train split's unsafe share cut.

    Args:
        path, split, drop_empty: As :func:`~safealign.data.sources.load_diasafety`.
        unsafe_share: Unsafe share of the training split (0.04 / 0.1 / 0.3 = DiaSafety-S/M/H);
            None keeps the data as released.
        seed: Seed of the unsafe subsample.

    Returns:
        The Corpus; the cut rows are counted in ``dropped["unsafe_subsampled"]``.
    """
    if unsafe_share is not None:
        check_share(unsafe_share)  # before reading the file
    corpus = load_diasafety(path, split=split, drop_empty=drop_empty)
    if unsafe_share is None:
        return corpus
    if not corpus.train:
        raise ConfigError(KEY, f"cuts the training split, but {path} (split={split}) has none")
    corpus.train, stats = subsample_unsafe(corpus.train, unsafe_share, seed)
    corpus.dropped["unsafe_subsampled"] = stats["unsafe_dropped"]
    log.info(
        "diasafety unsafe_share=%s (seed %d): kept %d of %d unsafe rows beside %d others -> "
        "%d train rows, unsafe share %.4f",
        unsafe_share, seed, stats["unsafe_kept"], stats["unsafe_released"], stats["other"],
        stats["rows"], stats["unsafe_share"],
    )  # fmt: skip
    return corpus
