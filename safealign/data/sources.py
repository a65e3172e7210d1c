"""Data sources: one small loader per dataset, each a reader (:mod:`safealign.data.readers`) plus
a converter (:mod:`safealign.data.converters`), returning a Corpus of canonical records.

Formats (checked row by row; any violation is a DataError naming file, line and expectation):

- HH-RLHF (github.com/anthropics/hh-rlhf): JSONL or JSONL.gz rows ``{"chosen", "rejected"}``, each
  a whole ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` transcript. Each transcript is split after its
  OWN last ``"\\n\\nAssistant:"``: the prompt keeps every earlier turn and ends with the tag.
  As labelled SFT dialogues (both transcripts, ``[TOXIC]`` labels): :mod:`safealign.data.labeller`.
- DiaSafety (github.com/thu-coai/DiaSafety): one JSON array per split (``train.json``,
  ``val.json``, ``test.json``) of ``{context, response, category, label}``, label "Safe"/"Unsafe".
- Generic JSONL, format decided by the first row: ``{prompt, chosen, rejected[, toxic]}`` strings;
  TRL conversational rows (prompt = chat messages, each completion = one assistant message);
  TRL implicit-prompt rows / HH transcripts ``{chosen, rejected}``; dialogue rows
  ``{context, response[, label][, topic|category]}``; TRL SFT rows ``{prompt, completion}`` and
  ``{messages}`` (dialogues). Extra keys are ignored.
- Any file a reader reads, with the same row formats: :func:`load_rows`.
- Any of these by hub id or through ``datasets.load_dataset``: :mod:`safealign.data.hub`.
- XSTest (github.com/paul-rottger/exaggerated-safety): CSV ``id,prompt,type,label,focus,note``.

Rows that are dropped instead of failing, and how they are counted: :mod:`safealign.data.drops`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path

from safealign.data.converters import (
    CONVERTERS,
    FIELDS,
    check_limit,
    convert_rows,
    converter,
    diasafety_row,
    renamed,
    to_dialogues,
)
from safealign.data.drops import add_records
from safealign.data.hub import HF_SPLITS, SPLITS
from safealign.data.readers import (
    existing_file,
    existing_path,
    read_csv,
    read_json_array,
    read_jsonl,
)
from safealign.errors import ConfigError, DataError
from safealign.types import SAFE, UNSAFE, Corpus, chat_prompt

_HH_FILES = {s: (f"{s}.jsonl.gz", f"{s}.jsonl") for s in SPLITS}
_DIASAFETY_FILES = {s: (f"{s}.json",) for s in SPLITS}
Reader = Callable[[Path], Iterable[tuple[int, dict]]]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError("split", f"expected one of {SPLITS}, got {split!r}")
    return split


def _split_files(folder: Path, names: dict[str, tuple[str, ...]], require_all: bool) -> dict:
    """Map split -> file inside ``folder`` (first existing candidate name per split)."""
    found = {}
    for split, candidates in names.items():
        hits = [folder / n for n in candidates if (folder / n).is_file()]
        if hits:
            found[split] = hits[0]
        elif require_all:
            raise DataError(folder / candidates[0], "does not exist: expected one file per split")
    if not found:
        expected = [n for c in names.values() for n in c]
        raise DataError(folder, f"holds no split file: expected any of {expected}")
    return found


def load_hh_rlhf(
    path: str | Path, split: str = "train", max_rows: int | None = None, as_dialogues: bool = False
) -> Corpus:
    """Load HH-RLHF ``{chosen, rejected}`` transcripts as preference pairs.

    Args:
        path: a ``.jsonl``/``.jsonl.gz`` file (all rows go to ``split``), or a folder such as
            ``harmless-base/`` whose ``train``/``val``/``test`` ``.jsonl(.gz)`` files go to their
            own splits (at least one must exist; ``split`` is then unused).
        max_rows: keep at most this many records per file (reading stops there).
        as_dialogues: return ``DialogueExample(prompt, chosen, "unknown")`` for SFT instead; the
            same rows are dropped either way, so both views cover the same prompts.
    """
    _check_split(split)
    check_limit(max_rows, "max_rows")
    p = existing_path(path)
    files = _split_files(p, _HH_FILES, require_all=False) if p.is_dir() else {split: p}
    corpus = Corpus(name="hh_rlhf")
    for name, f in files.items():
        convert = CONVERTERS["transcript"]
        records, dropped = convert_rows(f, read_jsonl(f), "hh_rlhf", convert, max_rows)
        add_records(corpus, name, to_dialogues(records) if as_dialogues else records, dropped)
    return corpus


def load_diasafety(path: str | Path, split: str = "train", drop_empty: bool = True) -> Corpus:
    """Load DiaSafety as labelled dialogues (context -> one user turn, label -> safe/unsafe).

    Args:
        path: one split's JSON array (all rows go to ``split``), or the folder holding
            ``train.json``, ``val.json`` and ``test.json`` (all three required).
        drop_empty: drop rows with a blank response (counted as ``empty_response``); with False
            they are kept with response ``" "``.
    """
    _check_split(split)
    p = existing_path(path)
    files = _split_files(p, _DIASAFETY_FILES, require_all=True) if p.is_dir() else {split: p}
    corpus = Corpus(name="diasafety")
    convert = partial(diasafety_row, drop_empty=drop_empty)
    for name, f in files.items():
        add_records(corpus, name, *convert_rows(f, read_json_array(f), "diasafety", convert))
    return corpus


def load_rows(
    path: str | Path,
    reader: Reader,
    split: str = "train",
    row_format: str | None = None,
    columns: Mapping[str, str] | None = None,
    max_rows: int | None = None,
    as_dialogues: bool = False,
    source_name: str | None = None,
) -> Corpus:
    """Load one file with ``reader`` into ``split``: the generic loader behind one-YAML formats.

    Args:
        reader: ``path -> (line, row)`` records (:mod:`safealign.data.readers`).
        row_format: a converter name (``CONVERTERS``); None detects it from the first row.
        columns: ``{record field: column}`` renames, e.g. ``{context: utterance}``.
        max_rows: keep at most this many records.
        as_dialogues: preference pairs become (prompt, chosen) dialogues, for SFT.
        source_name: the records' ``source`` (default: the file name up to its first dot, which
            is also the Corpus name).
    """
    _check_split(split)
    check_limit(max_rows, "data.source.max_rows")
    convert = converter(row_format)
    unknown = sorted(set(columns or {}) - set(FIELDS))
    if unknown:
        raise ConfigError("data.source.columns", f"unknown record field(s) {unknown}: {FIELDS}")
    p = existing_file(path)
    name = p.name.split(".")[0]
    rows = renamed(reader(p), columns or {})
    records, dropped = convert_rows(p, rows, source_name or name, convert, max_rows)
    corpus = Corpus(name=name)
    add_records(corpus, split, to_dialogues(records) if as_dialogues else records, dropped)
    return corpus


def load_jsonl(path: str | Path, split: str = "train") -> Corpus:
    """Load a generic preference or dialogue JSONL(.gz) file (format from its first row) into
    ``split``; see the module docstring for the accepted row formats."""
    return load_rows(path, read_jsonl, split, source_name="jsonl")


def load_hf_dataset_dir(path: str | Path, split: str = "train") -> Corpus:
    """Load a folder written by ``Dataset.save_to_disk`` (rows go to ``split``) or
    ``DatasetDict.save_to_disk`` (train/validation|val|valid|dev/test go to their own splits).

    Rows use the generic JSONL formats; error "lines" are 1-based row numbers. Arrow files only:
    no code is executed and nothing is downloaded.
    """
    _check_split(split)
    p = existing_path(path)
    try:
        import datasets  # lazy: heavy import, and only this loader needs it
    except ImportError as e:
        raise DataError(p, "loading a saved dataset needs the 'datasets' package") from e
    try:
        loaded = datasets.load_from_disk(str(p))
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise DataError(p, f"not a folder written by datasets' save_to_disk ({e})") from e
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {split: loaded}
    corpus = Corpus(name=p.name)
    for name, ds in parts.items():
        if name not in HF_SPLITS:
            raise DataError(
                p / name, f"unknown split {name!r}: expected one of {sorted(HF_SPLITS)}"
            )
        rows = ((i, dict(row)) for i, row in enumerate(ds, start=1))
        add_records(corpus, HF_SPLITS[name], *convert_rows(p / name, rows, "hf_dataset"))
    return corpus


def _xstest_row(p: Path, line: int, row: dict) -> dict:
    text, label = row["prompt"] or "", (row["label"] or "").strip().lower()
    if label not in (SAFE, UNSAFE):
        raise DataError(p, f"column 'label' must be safe/unsafe, got {row['label']!r}", line)
    if not text.strip():
        raise DataError(p, "column 'prompt' is empty", line)
    out = {"prompt": chat_prompt([text]), "text": text, "type": row["type"] or ""}
    return {**out, "label": label, "id": row.get("id") or ""}


def load_xstest(path: str | Path) -> list[dict]:
    """Load XSTest prompts: ``{"prompt", "text", "type", "label", "id"}`` per CSV row, where
    ``prompt`` is the project-convention prompt and ``text`` the raw CSV prompt."""
    p = existing_file(path)
    out = [_xstest_row(p, line, row) for line, row in read_csv(p, ("prompt", "type", "label"))]
    if not out:
        raise DataError(p, "no prompt rows after the header")
    return out
