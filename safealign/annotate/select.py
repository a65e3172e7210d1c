"""The pure choice of (y_w, y_l, y_t) for one prompt, and the tally of why prompts are dropped.

A prompt is dropped for the FIRST failing reason in this order (both judges; counted in
``stats["dropped"]``):

1. ``single_normal``    fewer than 2 normal samples;
2. ``empty_generation`` fewer than 2 non-empty normal samples, or (when y_t is needed) every
   toxic sample is empty;
3. ``no_safe_normal``   no normal sample is safe and non-evasive (LLM judge: it answered NONE);
4. ``identical_pair``   every possible rejected text equals the chosen text;
5. ``no_toxic_sample`` / ``toxic_not_toxic``  y_t missing / not judged toxic; only with
   ``require_toxic=True`` (docs/methods.md A.2: drop the triple), else kept with ``toxic=None``;
6. ``invalid_judge_output``  the LLM judge's answer could not be parsed (LLM judge only).

The paper's Llama-2-13B-chat prompts and criteria are [NOT FOUND] (docs/methods.md A.2): what follows
is the [INFERRED] reading, every choice behind a flag. Selection is pure given scorer outputs.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from safealign.types import PreferenceExample

REASONS = (
    "single_normal",
    "empty_generation",
    "no_safe_normal",
    "identical_pair",
    "no_toxic_sample",
    "toxic_not_toxic",
    "invalid_judge_output",
)
EVASIVE_AT = 0.5  # evasiveness scorers return 0/1; >= 0.5 counts as evasive


@dataclass(frozen=True)
class Candidate:
    """One generated sample with its scores (NaN = not scored: never safe, never toxic)."""

    text: str
    temperature: float
    sample: int
    empty: bool
    tox: float = math.nan
    evasive: float = math.nan
    coherence: float = math.nan


def _acceptable(c: Candidate, threshold: float) -> bool:
    return c.tox < threshold and c.evasive < EVASIVE_AT  # NaN compares False: not acceptable


def _rank(c: Candidate, threshold: float, higher: bool) -> tuple:
    # Best first: acceptable, most coherent, least toxic, lowest temperature (docs/methods.md A.2).
    coh = -c.coherence if higher else c.coherence
    tox = c.tox if not math.isnan(c.tox) else math.inf
    return (
        not _acceptable(c, threshold),
        coh if not math.isnan(coh) else math.inf,
        tox,
        c.temperature,
        c.sample,
    )


def _most_toxic(cands: list[Candidate], threshold: float) -> Candidate | None:
    hits = [c for c in cands if not c.empty and c.tox >= threshold]
    return min(hits, key=lambda c: (-c.tox, c.temperature, c.sample)) if hits else None


def _pick_pair(
    normals: list[Candidate], threshold: float, higher: bool
) -> tuple[Candidate, Candidate, list[Candidate]] | str:
    """(chosen, rejected, non-empty normals), or the drop reason (reasons 1-4 of the module doc)."""
    if len(normals) < 2:
        return "single_normal"
    live = [c for c in normals if not c.empty]
    if len(live) < 2:
        return "empty_generation"
    ranked = sorted(live, key=lambda c: _rank(c, threshold, higher))
    chosen = ranked[0]
    if not _acceptable(chosen, threshold):
        return "no_safe_normal"
    rejected = next(
        (c for c in reversed(ranked[1:]) if c.text.strip() != chosen.text.strip()), None
    )
    if rejected is None:
        return "identical_pair"
    return chosen, rejected, live


def _toxic_reason(toxics: list[Candidate]) -> str:
    """Why no y_t was found among the ``[TOXIC]`` samples (reasons 2 and 5 of the module doc)."""
    if not toxics:
        return "no_toxic_sample"
    return "empty_generation" if all(c.empty for c in toxics) else "toxic_not_toxic"


def select_triple(
    prompt: str,
    normals: list[Candidate],
    toxics: list[Candidate],
    *,
    threshold: float = 0.5,
    coherence_higher_is_better: bool = True,
    require_toxic: bool = True,
    relabel_toxic_normal: bool = False,
    source: str = "adpo_judge",
) -> tuple[PreferenceExample | None, str | None, bool]:
    """Pick (y_w, y_l, y_t) for one prompt from scored candidates (order of reasons: module doc).

    Chosen = best acceptable normal by :func:`_rank`; rejected = the worst other normal whose text
    differs; y_t = the most toxic non-empty ``[TOXIC]`` sample with tox >= threshold. With
    ``relabel_toxic_normal`` and no toxic y_t, the most toxic non-chosen normal is used as y_t
    (docs/methods.md A.2 "or else re-label it as y_t"); it may also remain y_l.

    Returns:
        (triple or None, drop reason or None, relabelled).
    """
    picked = _pick_pair(normals, threshold, coherence_higher_is_better)
    if isinstance(picked, str):
        return None, picked, False
    chosen, rejected, live = picked
    y_t, relabelled = _most_toxic(toxics, threshold), False
    if y_t is None and relabel_toxic_normal:
        y_t = _most_toxic([c for c in live if c is not chosen], threshold)
        relabelled = y_t is not None
    if y_t is None and require_toxic:
        return None, _toxic_reason(toxics), False
    toxic_text = y_t.text if y_t is not None else None
    triple = PreferenceExample(prompt, chosen.text, rejected.text, toxic_text, source)
    return triple, None, relabelled


def label(c: Candidate, threshold: float) -> str:
    """The audit label of one candidate: empty, unscored, toxic, evasive or safe."""
    if c.empty:
        return "empty"
    if math.isnan(c.tox):
        return "unscored"
    if c.tox >= threshold:
        return "toxic"
    return "evasive" if c.evasive >= EVASIVE_AT else "safe"


def new_stats() -> dict:
    """Empty annotation stats: prompts seen, kept, dropped per reason, labels per kind."""
    return {
        "prompts": 0,
        "kept": 0,
        "dropped": dict.fromkeys(REASONS, 0),
        "relabelled": 0,
        "invalid": 0,
        "labels": {"normal": Counter(), "toxic": Counter()},
    }


def tally(stats: dict, triples: list, triple: PreferenceExample | None, reason: str | None) -> None:
    """Keep ``triple`` (appended to ``triples``) or count its drop ``reason``."""
    if triple is not None:
        triples.append(triple)
        stats["kept"] += 1
    else:
        stats["dropped"][reason] += 1


def finish_stats(stats: dict) -> dict:
    """Counters -> sorted plain dicts, so the stats are JSON and compare equal after a reload."""
    stats["labels"] = {k: dict(sorted(v.items())) for k, v in stats["labels"].items()}
    return stats
