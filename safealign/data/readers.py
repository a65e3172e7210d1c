"""File readers: one per on-disk format, each yielding records ``(line, row)``.

``line`` is the 1-based line where the row starts (for saved ``datasets`` folders: the 1-based
row) and ``row`` a dict. Readers know formats, not datasets: every failure is a DataError naming
the file and that line; turning rows into canonical examples is :mod:`safealign.data.converters`.

Adding a dataset format = one reader here + one YAML (+ its test):

- the reader: ``read_<format>(path) -> Iterator[tuple[int, dict]]``;
- ``conf/data/<name>.yaml``, a copy of ``conf/data/json.yaml``
  (``safealign.data.sources.load_rows``) with ``reader:`` pointing at it; ``columns:`` renames its fields to a converter's and
  ``row_format:`` picks the converter (:mod:`safealign.data.converters`), else it is detected;
- to evaluate on it too: ``conf/eval_set/<name>.yaml``, a copy of ``conf/eval_set/data_split.yaml``
  (``safealign.eval.eval_sets.corpus_split``) with the same ``source:``.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import re
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from safealign.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)
_DATA_SUFFIXES = {".jsonl", ".json", ".gz", ".csv", ".txt"}
_WS = re.compile(r"[ \t\n\r]*")
Records = Iterator[tuple[int, dict]]


def existing_path(path: str | Path) -> Path:
    """``path`` if it exists; else a DataError suggesting a similarly named sibling file."""
    p = Path(path)
    if p.exists():
        return p
    if not p.parent.is_dir():
        raise DataError(p, f"does not exist (nor does its folder {p.parent})")
    base = glob.escape(p.name.split(".")[0])
    near = sorted(q.name for q in p.parent.glob(f"{base}.*") if q.suffix in _DATA_SUFFIXES)
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    raise DataError(p, f"does not exist{hint}")


def existing_file(path: str | Path) -> Path:
    p = existing_path(path)
    if p.is_dir():
        raise DataError(p, "is a folder, expected a data file")
    if p.stat().st_size == 0:
        raise DataError(p, "file is empty")
    return p


def open_binary(p: Path) -> IO[bytes]:
    """Open for reading bytes, gunzipping when the file starts with the gzip magic (any name)."""
    with open(p, "rb") as f:
        magic = f.read(2)
    return gzip.open(p, "rb") if magic == _GZIP_MAGIC else open(p, "rb")


def kind_of(value: Any) -> str:
    """What a JSON value is, for error messages ("a list", "a number", ...)."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), "a list" if isinstance(value, list) else "an object")


def read_text(p: Path) -> str:
    """Whole file as text (gunzipped if needed); decoding failures become DataErrors."""
    try:
        with open_binary(p) as f:
            data = f.read()
    except _GZIP_ERRORS as e:
        raise DataError(p, f"truncated or corrupt gzip ({e})") from e
    try:
        return data.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        line = 1 + data.count(b"\n", 0, e.start)
        raise DataError(p, f"not UTF-8 text ({e.reason} at byte {e.start})", line) from e


def _parse_line(p: Path, line_no: int, raw: bytes) -> dict:
    try:  # decode per line so a bad byte is reported at its own line
        line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(p, f"not UTF-8 text ({e.reason} at byte {e.start})", line_no) from e
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        msg = f"malformed JSON ({e.msg}, column {e.colno}): expected one JSON object per line"
        raise DataError(p, msg, line_no) from e
    if not isinstance(row, dict):
        raise DataError(p, f"expected a JSON object, got {kind_of(row)}", line_no)
    return row


def read_jsonl(path: str | Path) -> Records:
    """JSON Lines, plain or gzipped: one record per non-blank line."""
    p = existing_file(path)
    line_no, n_rows = 0, 0
    try:
        with open_binary(p) as f:
            for line_no, raw in enumerate(f, start=1):
                if raw.strip():
                    n_rows += 1
                    yield line_no, _parse_line(p, line_no, raw)
    except _GZIP_ERRORS as e:  # raised mid-stream by gzip, after the lines before it were read
        raise DataError(p, f"truncated or corrupt gzip ({e})", line_no + 1) from e
    if n_rows == 0:
        raise DataError(p, "file is empty: expected one JSON object per line")


def read_json_array(path: str | Path) -> Records:
    """One JSON array of objects: one record per object, numbered by the line it starts on.

    Each object is decoded by the stdlib decoder (``raw_decode``); only the array's own
    punctuation is walked here, because ``json.load`` cannot say on which line an object starts
    and every later error (a missing field, a bad label) must name that line.
    """
    p = existing_file(path)
    text = read_text(p)
    pos = _WS.match(text).end()
    if pos == len(text):
        raise DataError(p, "file is empty: expected a JSON array of objects")
    line, seen = 1 + text.count("\n", 0, pos), pos
    if text[pos] != "[":
        found = "an object" if text[pos] == "{" else f"text starting with {text[pos]!r}"
        raise DataError(p, f"expected a JSON array of objects, got {found}", line)
    pos, decoder = _WS.match(text, pos + 1).end(), json.JSONDecoder()
    if text.startswith("]", pos):
        raise DataError(p, "the JSON array is empty: expected objects", line)
    while True:
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(p, f"malformed JSON ({e.msg}, column {e.colno})", e.lineno) from e
        line, seen = line + text.count("\n", seen, pos), pos  # incremental: O(file) in total
        if not isinstance(row, dict):
            raise DataError(p, f"expected a JSON object, got {kind_of(row)}", line)
        yield line, row
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos) and _WS.match(text, pos + 1).end() == len(text):
            return
        else:
            where = line + text.count("\n", seen, pos)
            raise DataError(p, "malformed JSON: expected ',' or a final ']' after an object", where)


def read_json_file(path: str | Path) -> Any:
    """The one JSON document of a ``.json`` file or of a ``.zip`` holding one ``.json`` member."""
    p = existing_file(path)
    try:
        if p.suffix != ".zip":
            return json.loads(read_text(p))
        with zipfile.ZipFile(p) as zf:
            members = [m for m in zf.namelist() if m.endswith(".json")]
            if len(members) != 1:
                raise DataError(p, f"expected exactly one .json member, found {members}")
            return json.loads(zf.read(members[0]))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(p, f"not a valid (zipped) JSON file: {e}") from e


def _check_fields(p: Path, line: int, last_line: int, row: dict) -> None:
    """A row with fewer fields than the header, or with extra ones, says which: the usual cause is
    an unclosed quote, which makes one field swallow the following lines."""
    short = [k for k, v in row.items() if k is not None and v is None]
    if short or None in row:
        what = f"missing column(s) {short}" if short else f"{len(row[None])} extra field(s)"
        hint = (
            f'; the row runs from line {line} to {last_line}: an unclosed quote (") on line {line}?'
            if last_line > line
            else ""
        )
        raise DataError(p, f"row does not match the header: {what}{hint}", line)


def read_csv(path: str | Path, required: tuple[str, ...] = ()) -> Records:
    """CSV with a header line: one record per row, numbered by the line it starts on (a quoted
    field may span lines). ``required`` columns must be in the header."""
    p = existing_file(path)
    reader = csv.DictReader(io.StringIO(read_text(p), newline=""))
    missing = set(required) - set(reader.fieldnames or [])
    if missing:
        raise DataError(p, f"missing CSV column(s) {sorted(missing)} in the header", 1)
    start = 2
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            _check_fields(p, line, reader.line_num, row)
            yield line, row
    except csv.Error as e:
        raise DataError(p, f"malformed CSV ({e})", reader.line_num) from e


def read_lines(path: str | Path) -> Records:
    """Plain text, one prompt per non-blank line: records ``{"prompt": line}``."""
    p = existing_file(path)
    for i, text in enumerate(read_text(p).splitlines(), start=1):
        if text.strip():
            yield i, {"prompt": text}
