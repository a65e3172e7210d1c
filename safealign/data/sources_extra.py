"""Row-level machinery behind the loaders in :mod:`safealign.data.sources`.

Reading (plain or gzipped JSONL, JSON arrays with per-row line numbers), field checks, and the
conversion of one JSON row into a canonical record. Every failure is a :class:`DataError` naming
the file, the 1-based line (for saved ``datasets`` folders: the 1-based row) and what was expected.
A row converter returns a record, or a drop-reason string that the caller counts in
``Corpus.dropped``.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from safealign.errors import DataError
from safealign.types import (
    ASSISTANT_TAG,
    HUMAN_TAG,
    LABELS,
    UNKNOWN,
    DialogueExample,
    PreferenceExample,
    as_response,
    chat_prompt,
)

_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)
_DATA_SUFFIXES = {".jsonl", ".json", ".gz", ".csv", ".txt"}
_WS = re.compile(r"[ \t\n\r]*")
_ROLES = ("system", "user", "assistant")
Record = PreferenceExample | DialogueExample


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


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), "a list" if isinstance(value, list) else "an object")


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
        raise DataError(p, f"expected a JSON object, got {_kind(row)}", line_no)
    return row


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` per non-blank line of a ``.jsonl`` or ``.jsonl.gz`` file."""
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


def iter_json_array(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_of_row_start, row)`` for each object of a file holding one JSON array."""
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
            raise DataError(p, f"expected a JSON object, got {_kind(row)}", line)
        yield line, row
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos) and _WS.match(text, pos + 1).end() == len(text):
            return
        else:
            where = line + text.count("\n", seen, pos)
            raise DataError(p, "malformed JSON: expected ',' or a final ']' after an object", where)


def get_field(p: Path, line: int, row: dict, key: str, kind: type = str, optional: bool = False):
    """``row[key]`` checked to be of ``kind``; an optional field may be absent or null (-> None)."""
    value = row.get(key)
    if value is None:
        if optional:
            return None
        what = "missing field" if key not in row else "null field"
        raise DataError(p, f"{what} '{key}' (row has keys {sorted(row)})", line)
    if not isinstance(value, kind):
        raise DataError(p, f"field '{key}' must be {_kind(kind())}, got {_kind(value)}", line)
    return value


def as_prompt(text: str) -> str:
    """Project-convention prompt: a transcript ending with the assistant tag is kept (trailing
    whitespace removed); anything else is one user turn."""
    t = text.rstrip()
    return t if t.endswith(ASSISTANT_TAG) else chat_prompt([text])


def split_transcript(p: Path, line: int, key: str, text: str) -> tuple[str, str]:
    """Split an HH transcript after its LAST assistant tag: (prompt incl. the tag, final reply)."""
    cut = text.rfind(ASSISTANT_TAG)
    if cut < 0:
        raise DataError(
            p, f"field '{key}' has no '\\n\\nAssistant:' turn (expected a transcript)", line
        )
    cut += len(ASSISTANT_TAG)
    return text[:cut], text[cut:]


def _message(p: Path, line: int, key: str, i: int, m: Any) -> tuple[str, str]:
    ok = isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)
    if not ok:
        want = "{'role': 'system'|'user'|'assistant', 'content': <string>}"
        raise DataError(p, f"field '{key}' message {i + 1}: expected {want}, got {m!r:.80}", line)
    return m["role"], m["content"].strip()


def messages_to_prompt(p: Path, line: int, key: str, messages: list) -> str:
    """TRL chat messages -> project prompt. System text becomes the first line(s) of the next user
    turn (the HH convention has no system slot); the prompt must end with a user turn."""
    parts: list[str] = []
    system: list[str] = []
    role = ""
    for i, m in enumerate(messages):
        role, content = _message(p, line, key, i, m)
        if role == "system":
            system.append(content)
            continue
        if role == "assistant" and system:
            raise DataError(p, f"field '{key}': a system message must precede a user turn", line)
        if role == "user":
            content, system = "\n".join([*system, content]), []
        parts.append(f"{HUMAN_TAG if role == 'user' else ASSISTANT_TAG} {content}")
    if role != "user":
        raise DataError(p, f"field '{key}': expected messages ending with a user turn", line)
    return "".join(parts) + ASSISTANT_TAG


def assistant_reply(p: Path, line: int, key: str, messages: list) -> str:
    """The text of a TRL completion: exactly one assistant message."""
    if len(messages) != 1:
        raise DataError(p, f"field '{key}': expected exactly one assistant message", line)
    role, content = _message(p, line, key, 0, messages[0])
    if role != "assistant":
        raise DataError(p, f"field '{key}': expected role 'assistant', got {role!r}", line)
    return content


def _pair(prompt: str, chosen: str, rejected: str, toxic: str | None, source: str) -> Record | str:
    texts = [chosen, rejected] + ([] if toxic is None else [toxic])
    if any(not t.strip() for t in texts):
        return "empty_response"
    chosen, rejected = as_response(chosen), as_response(rejected)
    if chosen == rejected:
        return "identical_pair"
    toxic = None if toxic is None else as_response(toxic)
    return PreferenceExample(prompt, chosen, rejected, toxic, source)


def preference_row(p: Path, line: int, row: dict, source: str) -> Record | str:
    """``{prompt, chosen, rejected[, toxic]}`` strings."""
    prompt = as_prompt(get_field(p, line, row, "prompt"))
    chosen, rejected = (get_field(p, line, row, k) for k in ("chosen", "rejected"))
    return _pair(prompt, chosen, rejected, get_field(p, line, row, "toxic", optional=True), source)


def conversational_row(p: Path, line: int, row: dict, source: str) -> Record | str:
    """TRL conversational preference row: prompt = messages, completions = one assistant message."""
    prompt = messages_to_prompt(p, line, "prompt", get_field(p, line, row, "prompt", list))
    chosen, rejected = (
        assistant_reply(p, line, k, get_field(p, line, row, k, list))
        for k in ("chosen", "rejected")
    )
    toxic = get_field(p, line, row, "toxic", list, optional=True)
    toxic = None if toxic is None else assistant_reply(p, line, "toxic", toxic)
    return _pair(prompt, chosen, rejected, toxic, source)


def transcript_row(p: Path, line: int, row: dict, source: str) -> Record | str:
    """HH-RLHF ``{chosen, rejected}`` transcripts; rows whose two prompts differ are dropped."""
    prompt, chosen = split_transcript(p, line, "chosen", get_field(p, line, row, "chosen"))
    other, rejected = split_transcript(p, line, "rejected", get_field(p, line, row, "rejected"))
    if prompt != other:
        return "prompt_mismatch"
    return _pair(prompt, chosen, rejected, None, source)


def implicit_conversation_row(p: Path, line: int, row: dict, source: str) -> Record | str:
    """TRL implicit-prompt rows: chosen/rejected are whole chats that differ in the last reply."""
    chosen, rejected = (get_field(p, line, row, k, list) for k in ("chosen", "rejected"))
    if chosen[:-1] != rejected[:-1]:
        return "prompt_mismatch"
    prompt = messages_to_prompt(p, line, "chosen", chosen[:-1])
    reply = assistant_reply(p, line, "chosen", chosen[-1:])
    return _pair(prompt, reply, assistant_reply(p, line, "rejected", rejected[-1:]), None, source)


def parse_label(p: Path, line: int, value: str | None) -> str:
    label = UNKNOWN if value is None else value.strip().lower()
    if label not in LABELS:
        raise DataError(p, f"field 'label' must be one of {LABELS} (any case), got {value!r}", line)
    return label


def dialogue_row(p: Path, line: int, row: dict, source: str) -> Record | str:
    """``{context, response[, label][, topic|category]}`` -> DialogueExample."""
    context, response = (get_field(p, line, row, k) for k in ("context", "response"))
    label = parse_label(p, line, get_field(p, line, row, "label", optional=True))
    topic = get_field(p, line, row, "topic", optional=True)
    topic = topic if topic is not None else get_field(p, line, row, "category", optional=True)
    if not response.strip():
        return "empty_response"
    return DialogueExample(as_prompt(context), as_response(response), label, topic or "", source)


def messages_row(p: Path, line: int, row: dict, source: str) -> Record | str:
    """TRL conversational SFT row ``{messages[, label]}``: the last message is the (assistant)
    response, every earlier one is the prompt (so only the final reply is trained on)."""
    messages = get_field(p, line, row, "messages", list)
    if len(messages) < 2:
        raise DataError(p, "field 'messages': expected a prompt and a final assistant turn", line)
    prompt = messages_to_prompt(p, line, "messages", messages[:-1])
    response = assistant_reply(p, line, "messages", messages[-1:])
    label = parse_label(p, line, get_field(p, line, row, "label", optional=True))
    if not response.strip():
        return "empty_response"
    return DialogueExample(prompt, as_response(response), label, "", source)


def completion_row(p: Path, line: int, row: dict, source: str) -> Record | str:
    """TRL prompt-completion row: strings, or prompt messages + one assistant message."""
    if isinstance(row.get("label"), bool):  # TRL unpaired preference (KTO): not a target to copy
        raise DataError(p, "unpaired preference rows (boolean 'label') are not supported", line)
    if isinstance(row.get("prompt"), list):
        prompt = messages_to_prompt(p, line, "prompt", row["prompt"])
        response = assistant_reply(p, line, "completion", get_field(p, line, row, "completion", list))
    else:
        prompt = as_prompt(get_field(p, line, row, "prompt"))
        response = get_field(p, line, row, "completion")
    if not response.strip():
        return "empty_response"
    return DialogueExample(prompt, as_response(response), UNKNOWN, "", source)


def to_dialogues(records: list[Record]) -> list[Record]:
    """Preference pairs -> (prompt, chosen) dialogues for SFT; dialogues pass through."""
    return [
        DialogueExample(r.prompt, r.chosen, UNKNOWN, "", r.source)
        if isinstance(r, PreferenceExample)
        else r
        for r in records
    ]


Converter = Callable[[Path, int, dict, str], Record | str]
CONVERTERS: dict[str, Converter] = {
    "preference": preference_row,
    "conversational": conversational_row,
    "transcript": transcript_row,
    "implicit_conversation": implicit_conversation_row,
    "dialogue": dialogue_row,
    "messages": messages_row,
    "completion": completion_row,
}


def detect_format(p: Path, line: int, row: dict) -> str:
    """Name of the row format, decided from one row's keys (and whether ``prompt`` is a list)."""
    if "prompt" in row and "chosen" in row:
        return "conversational" if isinstance(row["prompt"], list) else "preference"
    if "chosen" in row and "rejected" in row:
        return "implicit_conversation" if isinstance(row["chosen"], list) else "transcript"
    if "context" in row and "response" in row:
        return "dialogue"
    if "prompt" in row and "completion" in row:
        return "completion"
    if "messages" in row:
        return "messages"
    expected = (
        "{prompt, chosen, rejected[, toxic]}, {chosen, rejected}, {context, response[, label]}, "
        "{prompt, completion} or {messages}"
    )
    raise DataError(p, f"unrecognised row keys {sorted(row)}: expected {expected}", line)


def convert_rows(
    p: Path,
    rows: Iterable[tuple[int, dict]],
    source: str,
    fmt: str | None = None,
    limit: int | None = None,
) -> tuple[list[Record], dict[str, int]]:
    """Convert rows with ONE converter (``fmt``, else detected from the first row; a later row that
    does not fit it fails on its missing/mistyped field). Stops after ``limit`` kept records."""
    records: list[Record] = []
    dropped: Counter[str] = Counter()
    convert, n_rows = (CONVERTERS[fmt] if fmt else None), 0
    for line, row in rows:
        convert = convert or CONVERTERS[detect_format(p, line, row)]
        out, n_rows = convert(p, line, row, source), n_rows + 1
        if isinstance(out, str):
            dropped[out] += 1
            continue
        records.append(out)
        if limit is not None and len(records) >= limit:
            break
    if n_rows == 0:
        raise DataError(p, "no rows to load")
    return records, dict(dropped)
