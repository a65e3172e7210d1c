"""Prompt rows: what evaluation and generation read, from a corpus or from any prompt file.

A row is ``{"prompt": str, ...}`` with ``prompt`` in the project convention (ends with
``"\\n\\nAssistant:"``). Optional keys:

- ``reference``: a gold response (BLEU-4 is computed over the rows that have one);
- ``reference_label``: the gold response's safety label (dialogue corpora: built-in, DiaSafety);
- ``topic``: the dialogue's topic (dialogue corpora);
- ``label``: the PROMPT's own label, ``"safe"`` or ``"unsafe"`` (XSTest). Only this key drives
  the over-refusal split (refusal rate on safe prompts vs on unsafe prompts);
- ``type``, ``id``: XSTest's prompt type and id.
"""

from __future__ import annotations

from pathlib import Path
from typing import NotRequired, TypedDict

from safealign.data.fields import row_prompt
from safealign.data.hub import SPLITS
from safealign.data.readers import existing_path, read_json_array, read_jsonl, read_lines
from safealign.data.sources import load_diasafety, load_hf_dataset_dir, load_hh_rlhf, load_xstest
from safealign.errors import DataError
from safealign.types import Corpus, DialogueExample, PreferenceExample

_PROMPT_READERS = {  # file-name ending -> reader; rows hold a prompt, context or HH transcript
    ".txt": read_lines,
    ".json": read_json_array,
    ".json.gz": read_json_array,
    ".jsonl": read_jsonl,
    ".jsonl.gz": read_jsonl,
}


class PromptRow(TypedDict):
    """One evaluation prompt (a dict, so rows round-trip through JSON unchanged)."""

    prompt: str
    reference: NotRequired[str]
    reference_label: NotRequired[str]
    topic: NotRequired[str]
    label: NotRequired[str]
    type: NotRequired[str]
    id: NotRequired[str]


def prompt_row(record: DialogueExample | PreferenceExample) -> PromptRow:
    """A corpus record as a prompt row: a dialogue's response (and its label) or a preference
    pair's chosen reply is the reference."""
    if isinstance(record, PreferenceExample):
        return {"prompt": record.prompt, "reference": record.chosen}
    return {
        "prompt": record.context,
        "reference": record.response,
        "reference_label": record.label,
        "topic": record.topic,
    }


def prompt_rows(corpus: Corpus, split: str) -> list[PromptRow]:
    """One prompt row per record of ``corpus``'s ``split``, in corpus order."""
    return [prompt_row(r) for r in getattr(corpus, split)]


def _folder_corpus(p: Path) -> Corpus:
    """A folder: a saved dataset, DiaSafety's split files, or HH-RLHF's."""
    if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
        return load_hf_dataset_dir(p)
    if (p / "train.json").exists():
        return load_diasafety(p)
    return load_hh_rlhf(p)


def load_eval_prompts(path: str | Path) -> list[str]:
    """Best-effort prompt list in the project convention, from: ``.txt`` (one prompt per line),
    ``.csv`` (XSTest), ``.json`` (array of rows), ``.jsonl(.gz)`` (rows with ``prompt``,
    ``context`` or HH ``chosen``), or a folder (saved dataset, DiaSafety or HH split files)."""
    p = existing_path(path)
    if p.is_dir():
        corpus = _folder_corpus(p)
        return [row["prompt"] for split in SPLITS for row in prompt_rows(corpus, split)]
    name = p.name.lower()
    reader = next((r for end, r in _PROMPT_READERS.items() if name.endswith(end)), None)
    if name.endswith(".csv"):
        prompts = [r["prompt"] for r in load_xstest(p)]
    elif reader is not None:
        prompts = [row_prompt(p, line, row) for line, row in reader(p)]
    else:
        raise DataError(p, "unsupported file type: expected .txt, .csv, .json or .jsonl(.gz)")
    if not prompts:
        raise DataError(p, "no prompts found")
    return prompts
