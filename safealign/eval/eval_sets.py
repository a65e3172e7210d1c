"""Evaluation prompt sets (``conf/eval_set/*.yaml``): each returns a list of prompt rows.

Rows are :class:`safealign.data.prompts.PromptRow` (the keys are documented there); corpus-based
sets build them with :func:`safealign.data.prompts.prompt_rows`, and any data source can be
evaluated on through :func:`corpus_split`. Every set validates through :func:`check_prompts`, so
a wrong format fails before any model is loaded. The real datasets live in ``../shared/data``
(``paths.data_dir``) when present.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safealign.data.builtin import BuiltinSpec
from safealign.data.prompts import PromptRow, load_eval_prompts, prompt_rows
from safealign.data.sources import load_diasafety, load_hh_rlhf, load_xstest
from safealign.errors import DataError
from safealign.eval.scorers import GroundTruthScorer
from safealign.types import ASSISTANT_TAG, SAFE, UNSAFE, Corpus

PROMPT_LABELS = (SAFE, UNSAFE)


def check_prompts(rows: object, source: str = "eval prompts") -> list[PromptRow]:
    """Validate prompt rows (see PromptRow); raises DataError naming the 1-based row."""
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


def corpus_split(source: Corpus | Callable[[], Corpus], split: str = "test") -> list[PromptRow]:
    """One prompt row per record of ``split`` of any data source (a Corpus, or a ``_partial_``
    loader as in ``conf/data/*.yaml``'s ``source:``)."""
    corpus = source() if callable(source) else source
    return check_prompts(prompt_rows(corpus, split), f"{corpus.name} {split} split")


def builtin_test(**spec: Any) -> list[PromptRow]:
    """The built-in corpus' test split, one row per dialogue (contexts never occur in train).

    ``spec``: :class:`BuiltinSpec` fields, which must equal the training run's ``data.source.*``
    (its ``seed`` is the training seed), otherwise this "test split" may overlap the data the
    model was trained on.
    """
    corpus = BuiltinSpec(**spec).dialogues()
    return check_prompts(prompt_rows(corpus, "test"), "builtin test split")


def builtin_ground_truth(**spec: Any) -> GroundTruthScorer:
    """Gold-label toxicity for built-in responses, from ALL splits (a model trained on the corpus
    reproduces train responses too). Texts not in the corpus score nan; the evaluator re-scores
    them with its fallback scorer and counts them (``n_unknown``). ``spec``: as
    :func:`builtin_test`."""
    corpus = BuiltinSpec(**spec).dialogues()
    return GroundTruthScorer.from_examples(corpus.train + corpus.val + corpus.test)


def diasafety_test(path: str | Path, split: str = "test") -> list[PromptRow]:
    """DiaSafety contexts of one split (``path``: the folder or that split's JSON file)."""
    corpus = load_diasafety(path, split=split)
    return check_prompts(prompt_rows(corpus, split), str(Path(path)))


def hh_harmless_test(
    path: str | Path, split: str = "test", max_rows: int | None = None
) -> list[PromptRow]:
    """HH-RLHF harmless prompts; the chosen (more harmless) reply is the BLEU reference."""
    corpus = load_hh_rlhf(path, split=split, max_rows=max_rows)
    return check_prompts(prompt_rows(corpus, split), str(Path(path)))


def xstest(path: str | Path) -> list[PromptRow]:
    """XSTest: 250 safe prompts that look unsafe and 200 unsafe ones (``label`` per prompt)."""
    rows: list[PromptRow] = [
        {"prompt": r["prompt"], "label": r["label"], "type": r["type"], "id": r["id"]}
        for r in load_xstest(path)
    ]
    return check_prompts(rows, str(path))


def prompt_file(path: str | Path) -> list[PromptRow]:
    """Any prompt file :func:`safealign.data.prompts.load_eval_prompts` reads (no references)."""
    return check_prompts([{"prompt": p} for p in load_eval_prompts(path)], str(path))
