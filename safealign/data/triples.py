"""Preference triples from labelled dialogues: the hidden labels pick chosen / rejected / toxic.

Used for the built-in corpus (:func:`safealign.data.builtin.builtin_preferences`) and valid for
any dialogues with labels and topics whose responses fit every context of their topic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from safealign.errors import ConfigError
from safealign.types import EVASIVE, SAFE, UNSAFE, DialogueExample, PreferenceExample

REJECTED_LABELS = {"unsafe_or_evasive": (UNSAFE, EVASIVE), "unsafe": (UNSAFE,),
                   "evasive": (EVASIVE,)}  # fmt: skip


def _pools(examples: Sequence[DialogueExample], label_sets) -> dict:
    """(labels, topic) -> responses, plus (labels, None) -> responses of every topic."""
    pools: dict = {}
    for labels in label_sets:
        for ex in examples:
            if ex.label in labels:
                pools.setdefault((labels, ex.topic), []).append(ex.response)
                pools.setdefault((labels, None), []).append(ex.response)
    return pools


def _draw(own: list[DialogueExample], labels, topic: str, pools: dict, rng) -> str | None:
    """A response with one of ``labels``: the context's own if it has one, else borrowed."""
    candidates = [ex.response for ex in own if ex.label in labels]
    candidates = candidates or pools.get((labels, topic)) or pools.get((labels, None))
    return candidates[int(rng.integers(len(candidates)))] if candidates else None


def preference_triples(
    dialogues: list[DialogueExample],
    seed: int = 0,
    rejected: str = "unsafe_or_evasive",
    pool: list[DialogueExample] | None = None,
) -> list[PreferenceExample]:
    """One (chosen, rejected, toxic) triple per distinct context, from the hidden labels.

    Contexts are grouped by ``meta["context_id"]`` (else the text), in first-appearance order.
    chosen is safe, rejected has a label in ``rejected`` ("unsafe_or_evasive" | "unsafe" |
    "evasive"), toxic is unsafe. A context's own response is used when its label fits; otherwise
    (most contexts have one safe response) one is drawn uniformly from the same topic's responses
    in ``pool`` (default ``dialogues``), else from any topic. Borrowing is sound here because
    built-in responses never mention the context's slot values. ``toxic`` is None only when
    ``pool`` has no unsafe response at all.

    Args:
        dialogues: labelled dialogues (any source; ``topic`` may be empty).
        seed: seeds a private generator; same inputs and seed, same triples.
        rejected: which labels count as rejected.
        pool: where missing responses are borrowed from.

    Raises:
        ConfigError: unknown ``rejected``, or ``pool`` has no safe / no rejected-label response.
    """
    if rejected not in REJECTED_LABELS:
        choices = sorted(REJECTED_LABELS)
        raise ConfigError("data.rejected", f"expected one of {choices}, got {rejected!r}")
    wanted = REJECTED_LABELS[rejected]
    pools = _pools(dialogues if pool is None else pool, dict.fromkeys([(SAFE,), wanted, (UNSAFE,)]))
    if dialogues and (SAFE,) not in {k[0] for k in pools}:
        raise ConfigError("data.poison_fraction", "no safe responses to use as 'chosen'")
    if dialogues and wanted not in {k[0] for k in pools}:
        key = "data.evasive_fraction" if wanted == (EVASIVE,) else "data.poison_fraction"
        raise ConfigError(key, f"no responses labelled {'/'.join(wanted)} to use as 'rejected'")
    groups: dict[str, list[DialogueExample]] = {}
    for ex in dialogues:
        groups.setdefault(ex.meta.get("context_id") or ex.context, []).append(ex)
    rng = np.random.default_rng(seed)
    out = []
    for own in groups.values():
        topic = own[0].topic
        chosen = _draw(own, (SAFE,), topic, pools, rng)
        rejected_text = _draw(own, wanted, topic, pools, rng)
        toxic = _draw(own, (UNSAFE,), topic, pools, rng)
        out.append(PreferenceExample(own[0].context, chosen, rejected_text, toxic, own[0].source))
    return out
