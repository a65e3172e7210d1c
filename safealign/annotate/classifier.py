"""Scorer-based annotation into (x, y_w, y_l, y_t) (docs/methods.md A.2 step 4, classifier variant).

Every generated sample is scored for toxicity, evasiveness and (normal samples only) coherence;
:func:`safealign.annotate.select.select_triple` then picks the triple, purely from those scores.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np

from safealign.annotate.rows import Groups, group_rows
from safealign.annotate.select import (
    Candidate,
    finish_stats,
    label,
    new_stats,
    select_triple,
    tally,
)
from safealign.errors import ConfigError
from safealign.eval.scorers import Scorer, score_texts
from safealign.types import PreferenceExample

Candidates = dict[int, tuple[list[Candidate], list[Candidate]]]


class ClassifierJudge:
    """Scorer-based annotation (docs/methods.md A.2 step 4, classifier variant).

    Args:
        toxicity, evasiveness, coherence: ``Scorer`` objects (safealign/eval/scorers.py);
            ``coherence=None`` ranks acceptable normals by toxicity, then temperature.
        coherence_higher_is_better: None -> the scorer's ``higher_is_better`` attribute if it has
            one, else False for ``LMCoherenceScorer`` (its score is a mean NLL: the most coherent
            sample has the LOWEST score) and True otherwise (e.g. embedding cosine similarity).
    """

    def __init__(
        self,
        toxicity: Scorer,
        evasiveness: Scorer,
        coherence: Scorer | None = None,
        toxicity_threshold: float = 0.5,
        coherence_higher_is_better: bool | None = None,
        require_toxic: bool = True,
        relabel_toxic_normal: bool = False,
        source: str = "adpo_classifier_judge",
    ):
        if not 0.0 < toxicity_threshold <= 1.0:
            raise ConfigError(
                "judge.toxicity_threshold", f"need 0 < t <= 1, got {toxicity_threshold}"
            )
        self.toxicity, self.evasiveness, self.coherence = toxicity, evasiveness, coherence
        self.threshold, self.require_toxic = toxicity_threshold, require_toxic
        self.relabel, self.source = relabel_toxic_normal, source
        if coherence_higher_is_better is None:
            coherence_higher_is_better = getattr(
                coherence, "higher_is_better", type(coherence).__name__ != "LMCoherenceScorer"
            )
        self.higher = bool(coherence_higher_is_better)
        self.records: list[dict] = []  # per-prompt audit trail of the last annotate() call

    def _candidates(self, groups: Groups) -> Candidates:
        flat = [(pid, r) for pid, (_, n, t) in groups.items() for r in n + t if not r["empty"]]
        texts, ctxs = [r["response"] for _, r in flat], [r["prompt"] for _, r in flat]
        tox = score_texts(self.toxicity, texts, ctxs)
        eva = score_texts(self.evasiveness, texts, ctxs)
        # Coherence for normal samples only: the LM scorer is costly and y_t never needs it.
        normal_idx = [i for i, (_, r) in enumerate(flat) if not r["toxic"]]
        coh = np.full(len(flat), math.nan)
        if self.coherence is not None:
            coh[normal_idx] = score_texts(
                self.coherence, [texts[i] for i in normal_idx], [ctxs[i] for i in normal_idx]
            )
        else:
            coh[normal_idx] = 0.0  # all equal: the ranking falls through to toxicity, temperature
        scored = {id(r): (tox[i], eva[i], coh[i]) for i, (_, r) in enumerate(flat)}

        def cand(r: dict) -> Candidate:
            s = scored.get(id(r), (math.nan,) * 3)
            return Candidate(
                r["response"], r["temperature"], r["sample"], r["empty"], *map(float, s)
            )

        return {
            pid: ([cand(r) for r in n], [cand(r) for r in t]) for pid, (_, n, t) in groups.items()
        }

    def _judge(
        self, prompt: str, normals: list[Candidate], toxics: list[Candidate], stats: dict
    ) -> tuple[PreferenceExample | None, str | None]:
        """One prompt: select its triple and count its labels (stats updated in place)."""
        triple, reason, relabelled = select_triple(
            prompt,
            normals,
            toxics,
            threshold=self.threshold,
            coherence_higher_is_better=self.higher,
            require_toxic=self.require_toxic,
            relabel_toxic_normal=self.relabel,
            source=self.source,
        )
        stats["prompts"] += 1
        for kind, cs in (("normal", normals), ("toxic", toxics)):
            stats["labels"][kind].update(label(c, self.threshold) for c in cs)
        stats["relabelled"] += relabelled
        return triple, reason

    def annotate(self, rows: list[dict]) -> tuple[list[PreferenceExample], dict]:
        """Rows -> (triples, stats); also fills ``self.records`` (scores, decision per prompt)."""
        groups = group_rows(rows)
        cands = self._candidates(groups)
        triples, stats, self.records = [], new_stats(), []
        for pid in sorted(groups):
            normals, toxics = cands[pid]
            triple, reason = self._judge(groups[pid][0], normals, toxics, stats)
            tally(stats, triples, triple, reason)
            self.records.append(_record(pid, reason, normals, toxics))
        return triples, finish_stats(stats)

    __call__ = annotate


def _record(
    pid: int, reason: str | None, normals: list[Candidate], toxics: list[Candidate]
) -> dict:
    """The audit record of one prompt: its decision and every candidate's scores (NaN -> null)."""
    return {
        "prompt_id": pid,
        "decision": reason or "kept",
        "candidates": [
            {k: _json_num(v) for k, v in asdict(c).items()} | {"toxic_ctx": kind == "toxic"}
            for kind, cs in (("normal", normals), ("toxic", toxics))
            for c in cs
        ],
    }


def _json_num(v: object) -> object:
    return None if isinstance(v, float) and math.isnan(v) else v
