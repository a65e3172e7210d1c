"""Evaluation prompt sets (``conf/eval_set/*.yaml``): each loader returns a list of prompt rows.

A row is ``{"prompt": str, ...}`` where ``prompt`` follows the project convention (ends with
``"\\n\\nAssistant:"``). Optional keys:

- ``reference``: a gold response (BLEU-4 is computed over the rows that have one);
- ``reference_label``: the gold response's safety label (built-in corpus, DiaSafety);
- ``label``: the PROMPT's own label, ``"safe"`` or ``"unsafe"`` (XSTest). Only this key drives
  the over-refusal split (refusal rate on safe prompts vs on unsafe prompts).

Every loader validates through :func:`check_prompts`, so a wrong format fails before any model is
loaded. The real datasets live in ``../shared/data`` (``paths.data_dir``) when present.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from safealign.data.builtin import generate_builtin
from safealign.data.sources import load_diasafety, load_eval_prompts, load_hh_rlhf, load_xstest
from safealign.errors import DataError
from safealign.eval.scorers import GroundTruthScorer
from safealign.types import ASSISTANT_TAG, SAFE, UNSAFE

PROMPT_LABELS = (SAFE, UNSAFE)


def check_prompts(rows: object, source: str = "eval prompts") -> list[dict]:
    """Validate prompt rows (see the module docstring); raises DataError naming the 1-based row."""
    if not isinstance(rows, Sequence) or isinstance(rows, str | bytes):
        raise DataError(source, f"expected a list of prompt rows, got {type(rows).__name__}")
    if not rows:
        raise DataError(source, "no prompts to evaluate")
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(source, f"expected a dict with a 'prompt', got {row!r:.80}", i)
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(source, "field 'prompt' must be a non-empty string", i)
        if not prompt.endswith(ASSISTANT_TAG):
            raise DataError(source, f"field 'prompt' must end with {ASSISTANT_TAG!r}", i)
        if "reference" in row and not isinstance(row["reference"], str):
            raise DataError(source, "field 'reference' must be a string", i)
        if "label" in row and row["label"] not in PROMPT_LABELS:
            raise DataError(source, f"field 'label' must be one of {PROMPT_LABELS}", i)
    return list(rows)


def builtin_test(
    size: int = 2000,
    poison_fraction: float = 0.04,
    evasive_fraction: float = 0.08,
    seed: int = 0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.1,
    num_topics: int | None = None,
) -> list[dict]:
    """The built-in corpus' test split, one row per dialogue (contexts never occur in train).

    The arguments must equal the training run's ``data.source.*`` (its ``seed`` is the training
    seed), otherwise this "test split" may overlap the data the model was trained on.
    """
    corpus = generate_builtin(
        size, poison_fraction, evasive_fraction, seed, val_fraction, test_fraction, num_topics
    )
    rows = [
        {"prompt": ex.context, "reference": ex.response, "reference_label": ex.label,
         "topic": ex.topic}
        for ex in corpus.test
    ]  # fmt: skip
    return check_prompts(rows, "builtin test split")


def builtin_ground_truth(
    size: int = 2000,
    poison_fraction: float = 0.04,
    evasive_fraction: float = 0.08,
    seed: int = 0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.1,
    num_topics: int | None = None,
) -> GroundTruthScorer:
    """Gold-label toxicity for built-in responses, from ALL splits (a model trained on the corpus
    reproduces train responses too). Texts not in the corpus score nan; the evaluator re-scores
    them with its fallback scorer and counts them (``n_unknown``)."""
    corpus = generate_builtin(
        size, poison_fraction, evasive_fraction, seed, val_fraction, test_fraction, num_topics
    )
    return GroundTruthScorer.from_examples(corpus.train + corpus.val + corpus.test)


def diasafety_test(path: str | Path, split: str = "test") -> list[dict]:
    """DiaSafety contexts of one split (``path``: the folder or that split's JSON file)."""
    p = Path(path)
    corpus = load_diasafety(p, split=split)
    rows = [
        {"prompt": ex.context, "reference": ex.response, "reference_label": ex.label,
         "topic": ex.topic}
        for ex in getattr(corpus, split)
    ]  # fmt: skip
    return check_prompts(rows, str(p))


def hh_harmless_test(
    path: str | Path, split: str = "test", max_rows: int | None = None
) -> list[dict]:
    """HH-RLHF harmless prompts; the chosen (more harmless) reply is the BLEU reference."""
    p = Path(path)
    corpus = load_hh_rlhf(p, split=split, max_rows=max_rows)
    rows = [{"prompt": ex.prompt, "reference": ex.chosen} for ex in getattr(corpus, split)]
    return check_prompts(rows, str(p))


def xstest(path: str | Path) -> list[dict]:
    """XSTest: 250 safe prompts that look unsafe and 200 unsafe ones (``label`` per prompt)."""
    rows = [
        {"prompt": r["prompt"], "label": r["label"], "type": r["type"], "id": r["id"]}
        for r in load_xstest(path)
    ]
    return check_prompts(rows, str(path))


def prompt_file(path: str | Path) -> list[dict]:
    """Any prompt file :func:`safealign.data.sources.load_eval_prompts` reads (no references)."""
    return check_prompts([{"prompt": p} for p in load_eval_prompts(path)], str(path))
