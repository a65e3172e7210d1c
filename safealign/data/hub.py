"""Datasets by hub id or local path, through ``datasets.load_dataset`` (``data=hf``).

``path`` is a hub id (``Anthropic/hh-rlhf``, ``thu-coai/diasafety``), a local folder laid out
like a hub repo (split files such as ``harmless-base/train.jsonl.gz`` or ``val.json``), a folder
written by ``save_to_disk``, or one ``.parquet``/``.json``/``.jsonl(.gz)``/``.csv`` file. Rows are
renamed by ``columns`` and then converted by the same row converters as the local loaders
(:mod:`safealign.data.converters`), so validation and drop counts are the same: TRL standard
``{prompt, chosen, rejected}``, conversational message lists, implicit-prompt chats, HH
transcripts, ``{prompt, completion}``, ``{messages}`` and dialogue ``{context, response, label}``.

Offline by default (``local_files_only=True``): the Hub is never contacted, so a hub id loads
only if ``datasets`` has it in its local cache (``HF_DATASETS_CACHE`` or ``cache_dir``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safealign.data.converters import (
    FIELDS,
    check_limit,
    convert_rows,
    converter,
    renamed,
    to_dialogues,
)
from safealign.data.drops import add_records
from safealign.data.readers import existing_path
from safealign.errors import ConfigError, DataError
from safealign.types import Corpus

SPLITS = ("train", "val", "test")
# Hub split name -> project split (the names ``datasets`` infers from split file names).
HF_SPLITS = {
    "train": "train",
    "validation": "val",
    "valid": "val",
    "val": "val",
    "dev": "val",
    "test": "test",
}
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # written by save_to_disk
_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@contextmanager
def _offline(enabled: bool) -> Iterator[None]:
    """Force the Hub libraries offline for one call; both read these flags at call time, and the
    env vars would only count if set before ``datasets`` was first imported."""
    import datasets.config as dc
    import huggingface_hub.constants as hc

    saved = dc.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE
    if enabled:
        dc.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dc.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE = saved


def _local(path: str) -> Path | None:
    """The local file/folder behind ``path``, None for a hub id; a path-like string that does not
    exist fails here (with a near-miss hint) instead of being looked up on the Hub."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    suffixes = {s for s in p.suffixes if s in _FILE_BUILDERS or s == ".gz"}
    if p.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1 or suffixes:
        existing_path(p)  # raises DataError
    return None


def _split_plan(split: str | Mapping | None) -> dict[str, str] | None:
    """``data.source.split`` -> {project split: hub split expression}; None = all, by name."""
    if split is None:
        return None
    if isinstance(split, str):
        return {"train": split}
    plan = {}
    for key, value in split.items():
        if key not in SPLITS:
            raise ConfigError(f"data.source.split.{key}", f"expected keys among {SPLITS}")
        if value is not None:
            plan[key] = str(value)
    if not plan:
        raise ConfigError("data.source.split", "maps no split to a hub split")
    return plan


def _not_cached(path: str, cache: str, offline: bool, err: Exception) -> DataError:
    where = f"data.source.path={path!r} is no local file or folder, and "
    if not offline:  # the Hub was asked and could not serve it
        return DataError(path, f"{where}the Hub could not provide it ({type(err).__name__}: {err})")
    msg = (
        f"{where}it is not in the local HF datasets cache ({cache}) for this name/data_dir/"
        "revision. Nothing is downloaded while data.source.local_files_only=true: load it once "
        "where the Hub is reachable with the same HF_DATASETS_CACHE, or set "
        "data.source.local_files_only=false"
    )
    return DataError(path, f"{msg} ({type(err).__name__}: {err})")


def _load_saved(local: Path, plan: dict[str, str] | None) -> dict[str, Any]:
    """A ``save_to_disk`` folder: Arrow files, read as they are (no slicing)."""
    import datasets

    loaded = datasets.load_from_disk(str(local))
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if plan is None:
        return parts
    if not set(plan.values()) <= set(parts):
        raise DataError(
            local, f"data.source.split names {plan}; the saved splits are {list(parts)}"
        )
    return {h: parts[h] for h in plan.values()}


def _load(
    path: str,
    plan: dict[str, str] | None,
    local_files_only: bool,
    cache_dir: str | None,
    **kwargs: Any,
) -> dict[str, Any]:
    """{hub split expression: Dataset} for ``path`` (see the module docstring)."""
    import datasets  # lazy: heavy import, and only this source needs it
    from datasets import config

    local = _local(path)
    if local is not None and any((local / f).is_file() for f in _SAVED_MARKERS):
        return _load_saved(local, plan)
    builder = path if local is None or local.is_dir() else None
    if builder is None:
        suffix = next((s for s in reversed(local.suffixes) if s in _FILE_BUILDERS), "")
        if not suffix:
            raise DataError(local, f"unsupported file type: expected one of {list(_FILE_BUILDERS)}")
        builder, kwargs["data_files"] = _FILE_BUILDERS[suffix], kwargs["data_files"] or str(local)
    hub_splits = None if plan is None else list(plan.values())
    cache = cache_dir or config.HF_DATASETS_CACHE
    try:
        with _offline(local_files_only):
            out = datasets.load_dataset(builder, split=hub_splits, cache_dir=cache_dir, **kwargs)
    except (ConnectionError, FileNotFoundError) as e:
        if local is None:
            raise _not_cached(path, cache, local_files_only, e) from e
        raise DataError(path, f"datasets.load_dataset failed ({type(e).__name__}: {e})") from e
    except ValueError as e:  # unknown split or config name, undecodable files, cache misses
        if local is None and "find cache" in str(e):  # cached, but not this config/data_dir
            raise _not_cached(path, cache, local_files_only, e) from e
        raise DataError(path, f"datasets.load_dataset failed: {e}") from e
    return dict(out) if hub_splits is None else dict(zip(hub_splits, out, strict=True))


def _column_map(where: Path, names: list[str], columns: Mapping | None) -> dict[str, str]:
    """Checked ``{record field: dataset column}``; a bad key or column names the config key."""
    mapping = dict(columns or {})
    for field, column in mapping.items():
        key = f"data.source.columns.{field}"
        if field not in FIELDS:
            raise ConfigError(key, f"unknown record field {field!r}: expected one of {FIELDS}")
        if column not in names:
            raise ConfigError(key, f"column {column!r} is not in {where} (columns: {names})")
    return mapping


def _convert(where: Path, ds: Any, source: str, columns: Mapping | None, convert, limit) -> tuple:
    """(records, drop counts) of one hub split, its columns renamed to record fields."""
    rows = renamed(enumerate(ds, start=1), _column_map(where, list(ds.column_names), columns))
    return convert_rows(where, rows, source, convert, limit)


def load_hf_dataset(
    path: str,
    name: str | None = None,
    data_dir: str | None = None,
    data_files: str | list | Mapping | None = None,
    split: str | Mapping | None = None,
    revision: str | None = None,
    columns: Mapping | None = None,
    row_format: str | None = None,
    max_rows: int | None = None,
    as_dialogues: bool = False,
    source_name: str | None = None,
    local_files_only: bool = True,
    cache_dir: str | None = None,
) -> Corpus:
    """Load a dataset by hub id or local path into a Corpus (see the module docstring).

    Args:
        path: hub id, local dataset folder, ``save_to_disk`` folder, or one data file.
        name, data_dir, data_files, revision: passed to ``datasets.load_dataset``.
        split: None loads every split (train / validation|val|valid|dev / test by name); a string
            loads that hub split (slices allowed, ``"train[:1000]"``) into train; a mapping
            ``{train: ..., val: ..., test: ...}`` names the hub split for each (null = none).
        columns: ``{record field: dataset column}``, e.g. ``{prompt: question, chosen: good}``.
        row_format: a converter name (``preference``, ``dialogue``, ...); None detects it per split.
        max_rows: keep at most this many records per split.
        as_dialogues: preference pairs become (prompt, chosen) dialogues, for SFT.
        source_name: ``source`` of the records and the Corpus name (default: last path part).
        local_files_only: never contact the Hub (offline cache or local files only).
        cache_dir: the ``datasets`` cache (default ``HF_DATASETS_CACHE``).
    """
    convert, limit = converter(row_format), check_limit(max_rows, "data.source.max_rows")
    plan = _split_plan(split)
    hub = dict(name=name, data_dir=data_dir, data_files=data_files, revision=revision)
    parts = _load(str(path), plan, local_files_only, cache_dir, **hub)
    source = source_name or Path(str(path)).name.split(".")[0]
    to_project = {v: k for k, v in plan.items()} if plan else HF_SPLITS
    corpus = Corpus(name=source)
    for hub_split, ds in parts.items():
        where = Path(str(path), data_dir or "", f"{hub_split}")
        if hub_split not in to_project:
            hint = "map it with data.source.split={train: <hub split>, ...}"
            raise DataError(
                where, f"unknown split {hub_split!r}: expected {sorted(HF_SPLITS)}; {hint}"
            )
        records, dropped = _convert(where, ds, source, columns, convert, limit)
        records = to_dialogues(records) if as_dialogues else records
        add_records(corpus, to_project[hub_split], records, dropped)
    return corpus
