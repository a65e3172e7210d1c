"""Evaluation: pure metrics (:mod:`.metrics`), scorers (:mod:`.scorers`, :mod:`.coherence`).

Only the pure metrics are re-exported here; import scorers from their modules so that
``import safealign.eval`` stays light (no transformers, sentence-transformers or sklearn).
"""

from __future__ import annotations

from safealign.eval.metrics import (
    avg_length,
    bleu4,
    distinct_n,
    dpr,
    evasiveness_rate,
    expected_max_toxicity,
    ngram_entropy,
    rpr,
    safety_score,
    toxicity_rate,
)

__all__ = [
    "avg_length",
    "bleu4",
    "distinct_n",
    "dpr",
    "evasiveness_rate",
    "expected_max_toxicity",
    "ngram_entropy",
    "rpr",
    "safety_score",
    "toxicity_rate",
]
