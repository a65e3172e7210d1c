"""Data sources: one small loader per real format, each returning canonical records (types.py).

Formats (checked row by row; any violation is a DataError naming file, line and expectation):

- HH-RLHF (github.com/anthropics/hh-rlhf): JSONL or JSONL.gz rows ``{"chosen", "rejected"}``, each
  a whole ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` transcript. Each transcript is split after its
  OWN last ``"\\n\\nAssistant:"``: the prompt keeps every earlier turn and ends with the tag.
- DiaSafety (github.com/thu-coai/DiaSafety): one JSON array per split (``train.json``,
  ``val.json``, ``test.json``) of ``{context, response, category, label}``, label "Safe"/"Unsafe".
- Generic JSONL, format decided by the first row: ``{prompt, chosen, rejected[, toxic]}`` strings;
  TRL conversational rows (prompt = chat messages, each completion = one assistant message);
  TRL implicit-prompt rows / HH transcripts ``{chosen, rejected}``; dialogue rows
  ``{context, response[, label][, topic|category]}``; TRL SFT rows ``{prompt, completion}`` and
  ``{messages}`` (dialogues). Extra keys are ignored.
- Any of these by hub id or through ``datasets.load_dataset``: :mod:`safealign.data.hub`.
- XSTest (github.com/paul-rottger/exaggerated-safety): CSV ``id,prompt,type,label,focus,note``.

Drop policy (never a crash; counted as reason -> count in ``Corpus.dropped``):

- ``prompt_mismatch``: the two transcripts' prompts differ, so the pair does not compare two
  replies to one context (5 of the 2,312 real harmless-base test rows);
- ``empty_response``: a blank chosen/rejected/toxic reply or dialogue response (4 real HH rows;
  3 real DiaSafety rows: 2 train, 1 test; DiaSafety keeps them with ``drop_empty=False``);
- ``identical_pair``: chosen == rejected after normalisation (none in the real HH test split).

Kept on purpose: the one duplicated DiaSafety train row (same context, response and label), so
the published split sizes stay exact apart from the documented drops.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

from safealign.data.hub import HF_SPLITS, SPLITS
from safealign.data.sources_extra import (
    as_prompt,
    convert_rows,
    existing_file,
    existing_path,
    get_field,
    iter_json_array,
    iter_jsonl,
    messages_to_prompt,
    read_text,
    split_transcript,
    to_dialogues,
)
from safealign.errors import ConfigError, DataError
from safealign.types import (
    SAFE,
    UNSAFE,
    Corpus,
    DialogueExample,
    as_response,
    chat_prompt,
)

__all__ = [
    "iter_jsonl",
    "load_diasafety",
    "load_eval_prompts",
    "load_hf_dataset_dir",
    "load_hh_rlhf",
    "load_jsonl",
    "load_xstest",
]

_HH_FILES = {s: (f"{s}.jsonl.gz", f"{s}.jsonl") for s in SPLITS}
_DIASAFETY_FILES = {s: (f"{s}.json",) for s in SPLITS}
_DIASAFETY_LABELS = {"Safe": SAFE, "Unsafe": UNSAFE}


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError("split", f"expected one of {SPLITS}, got {split!r}")
    return split


def _add(corpus: Corpus, split: str, records: list, dropped: dict[str, int]) -> None:
    getattr(corpus, split).extend(records)
    corpus.dropped = dict(Counter(corpus.dropped) + Counter(dropped))


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
    if max_rows is not None and max_rows < 1:
        raise ConfigError("max_rows", f"expected a positive integer or null, got {max_rows}")
    p = existing_path(path)
    files = _split_files(p, _HH_FILES, require_all=False) if p.is_dir() else {split: p}
    corpus = Corpus(name="hh_rlhf")
    for name, f in files.items():
        records, dropped = convert_rows(f, iter_jsonl(f), "hh_rlhf", "transcript", max_rows)
        _add(corpus, name, to_dialogues(records) if as_dialogues else records, dropped)
    return corpus


def _diasafety_row(p: Path, line: int, row: dict, drop_empty: bool) -> DialogueExample | None:
    context, response, label = (
        get_field(p, line, row, k) for k in ("context", "response", "label")
    )
    if label not in _DIASAFETY_LABELS:
        raise DataError(p, f"field 'label' must be 'Safe' or 'Unsafe', got {label!r}", line)
    if drop_empty and not response.strip():
        return None
    topic = get_field(p, line, row, "category", optional=True) or ""
    return DialogueExample(
        chat_prompt([context]), as_response(response), _DIASAFETY_LABELS[label], topic, "diasafety"
    )


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
    for name, f in files.items():
        rows = [_diasafety_row(f, line, row, drop_empty) for line, row in iter_json_array(f)]
        kept = [r for r in rows if r is not None]
        n_empty = len(rows) - len(kept)
        _add(corpus, name, kept, {"empty_response": n_empty} if n_empty else {})
    return corpus


def load_jsonl(path: str | Path, split: str = "train") -> Corpus:
    """Load a generic preference or dialogue JSONL(.gz) file (format from its first row) into
    ``split``; see the module docstring for the accepted row formats."""
    _check_split(split)
    p = existing_file(path)
    records, dropped = convert_rows(p, iter_jsonl(p), "jsonl")
    corpus = Corpus(name=p.name.split(".")[0], dropped=dropped)
    getattr(corpus, split).extend(records)
    return corpus


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
        _add(corpus, HF_SPLITS[name], *convert_rows(p / name, rows, "hf_dataset"))
    return corpus


def _xstest_row(p: Path, line: int, row: dict) -> dict:
    text, label = row["prompt"] or "", (row["label"] or "").strip().lower()
    if label not in (SAFE, UNSAFE):
        raise DataError(p, f"column 'label' must be safe/unsafe, got {row['label']!r}", line)
    if not text.strip():
        raise DataError(p, "column 'prompt' is empty", line)
    out = {"prompt": chat_prompt([text]), "text": text, "type": row["type"] or ""}
    return {**out, "label": label, "id": row.get("id") or ""}


def _check_fields(p: Path, line: int, last_line: int, row: dict) -> None:
    """A row with fewer fields than the header, or with extra ones, says which: the usual cause is
    an unclosed quote, which makes one field swallow the following lines."""
    short = [k for k, v in row.items() if k is not None and v is None]
    if short or None in row:
        what = f"missing column(s) {short}" if short else f"{len(row[None])} extra field(s)"
        hint = (
            f"; the row runs from line {line} to {last_line}: an unclosed quote (\") on line {line}?"
            if last_line > line
            else ""
        )
        raise DataError(p, f"row does not match the header: {what}{hint}", line)


def load_xstest(path: str | Path) -> list[dict]:
    """Load XSTest prompts: ``{"prompt", "text", "type", "label", "id"}`` per CSV row, where
    ``prompt`` is the project-convention prompt and ``text`` the raw CSV prompt."""
    p = existing_file(path)
    reader = csv.DictReader(io.StringIO(read_text(p), newline=""))
    missing = {"prompt", "type", "label"} - set(reader.fieldnames or [])
    if missing:
        raise DataError(p, f"missing CSV column(s) {sorted(missing)} in the header", 1)
    out, start = [], 2
    try:
        for row in reader:
            line, start = start, reader.line_num + 1  # a quoted field may span several lines
            _check_fields(p, line, reader.line_num, row)
            out.append(_xstest_row(p, line, row))
    except csv.Error as e:
        raise DataError(p, f"malformed CSV ({e})", reader.line_num) from e
    if not out:
        raise DataError(p, "no prompt rows after the header")
    return out


def _row_prompt(p: Path, line: int, row: dict) -> str:
    """The prompt of any supported row (prompt string/messages, dialogue context, HH transcript)."""
    if isinstance(row.get("prompt"), list):
        return messages_to_prompt(p, line, "prompt", row["prompt"])
    for key in ("prompt", "context"):
        if key in row:
            text = get_field(p, line, row, key)
            if not text.strip():
                raise DataError(p, f"field '{key}' is empty: expected a prompt", line)
            return as_prompt(text)
    if "chosen" in row:
        return split_transcript(p, line, "chosen", get_field(p, line, row, "chosen"))[0]
    raise DataError(p, f"no 'prompt', 'context' or 'chosen' field (row has {sorted(row)})", line)


def _corpus_prompts(corpus: Corpus) -> list[str]:
    records = corpus.train + corpus.val + corpus.test
    return [r.prompt if hasattr(r, "prompt") else r.context for r in records]


def load_eval_prompts(path: str | Path) -> list[str]:
    """Best-effort prompt list in the project convention, from: ``.txt`` (one prompt per line),
    ``.csv`` (XSTest), ``.json`` (array of rows), ``.jsonl(.gz)`` (rows with ``prompt``,
    ``context`` or HH ``chosen``), or a folder (saved dataset, DiaSafety or HH split files)."""
    p = existing_path(path)
    if p.is_dir():
        if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return _corpus_prompts(load_hf_dataset_dir(p))
        if (p / "train.json").exists():
            return _corpus_prompts(load_diasafety(p))
        return _corpus_prompts(load_hh_rlhf(p))
    name = p.name.lower()
    if name.endswith(".txt"):
        prompts = [as_prompt(t) for t in read_text(existing_file(p)).splitlines() if t.strip()]
    elif name.endswith(".csv"):
        prompts = [r["prompt"] for r in load_xstest(p)]
    elif name.endswith((".json", ".json.gz")):
        prompts = [_row_prompt(p, line, row) for line, row in iter_json_array(p)]
    elif name.endswith((".jsonl", ".jsonl.gz")):
        prompts = [_row_prompt(p, line, row) for line, row in iter_jsonl(p)]
    else:
        raise DataError(p, "unsupported file type: expected .txt, .csv, .json or .jsonl(.gz)")
    if not prompts:
        raise DataError(p, "no prompts found")
    return prompts
