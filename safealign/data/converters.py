"""Row converters: one reader record ``(line, row)`` -> a canonical record (types.py) or a drop
reason (:mod:`safealign.data.drops`).

``CONVERTERS`` is the registry, keyed by the names ``row_format`` takes in the configs
(``data.source.row_format``); :func:`detect_format` picks one from a row's keys. Every failure
is a DataError naming the file, the row's line and the field.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from safealign.data.drops import IDENTICAL_PAIR, PROMPT_MISMATCH, empty_response
from safealign.data.fields import (
    as_prompt,
    assistant_reply,
    get_field,
    messages_to_prompt,
    parse_label,
    split_transcript,
)
from safealign.errors import ConfigError, DataError
from safealign.types import (
    SAFE,
    UNKNOWN,
    UNSAFE,
    DialogueExample,
    PreferenceExample,
    as_response,
    chat_prompt,
)

Record = PreferenceExample | DialogueExample
Converter = Callable[[Path, int, dict, str], Record | str]
# Record fields a column can be renamed to (``columns:``): the converters' input keys.
FIELDS = tuple(
    "prompt chosen rejected toxic messages completion context response label topic category".split()
)
_DIASAFETY_LABELS = {"Safe": SAFE, "Unsafe": UNSAFE}


def _pair(prompt: str, chosen: str, rejected: str, toxic: str | None, source: str) -> Record | str:
    drop = empty_response(chosen, rejected, *([] if toxic is None else [toxic]))
    if drop:
        return drop
    chosen, rejected = as_response(chosen), as_response(rejected)
    if chosen == rejected:
        return IDENTICAL_PAIR
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
        return PROMPT_MISMATCH
    return _pair(prompt, chosen, rejected, None, source)


def implicit_conversation_row(p: Path, line: int, row: dict, source: str) -> Record | str:
    """TRL implicit-prompt rows: chosen/rejected are whole chats that differ in the last reply."""
    chosen, rejected = (get_field(p, line, row, k, list) for k in ("chosen", "rejected"))
    if chosen[:-1] != rejected[:-1]:
        return PROMPT_MISMATCH
    prompt = messages_to_prompt(p, line, "chosen", chosen[:-1])
    reply = assistant_reply(p, line, "chosen", chosen[-1:])
    return _pair(prompt, reply, assistant_reply(p, line, "rejected", rejected[-1:]), None, source)


def dialogue_row(p: Path, line: int, row: dict, source: str) -> Record | str:
    """``{context, response[, label][, topic|category]}`` -> DialogueExample."""
    context, response = (get_field(p, line, row, k) for k in ("context", "response"))
    label = parse_label(p, line, get_field(p, line, row, "label", optional=True))
    topic = get_field(p, line, row, "topic", optional=True)
    topic = topic if topic is not None else get_field(p, line, row, "category", optional=True)
    return empty_response(response) or DialogueExample(
        as_prompt(context), as_response(response), label, topic or "", source
    )


def diasafety_row(
    p: Path, line: int, row: dict, source: str, drop_empty: bool = True
) -> Record | str:
    """DiaSafety ``{context, response, category, label}``: label exactly "Safe"/"Unsafe", the
    context one user turn; with ``drop_empty=False`` a blank response is kept (as ``" "``)."""
    context, response, label = (
        get_field(p, line, row, k) for k in ("context", "response", "label")
    )
    if label not in _DIASAFETY_LABELS:
        raise DataError(p, f"field 'label' must be 'Safe' or 'Unsafe', got {label!r}", line)
    drop = empty_response(response) if drop_empty else None
    if drop:
        return drop
    topic = get_field(p, line, row, "category", optional=True) or ""
    return DialogueExample(
        chat_prompt([context]), as_response(response), _DIASAFETY_LABELS[label], topic, source
    )


def messages_row(p: Path, line: int, row: dict, source: str) -> Record | str:
    """TRL conversational SFT row ``{messages[, label]}``: the last message is the (assistant)
    response, every earlier one is the prompt (so only the final reply is trained on)."""
    messages = get_field(p, line, row, "messages", list)
    if len(messages) < 2:
        raise DataError(p, "field 'messages': expected a prompt and a final assistant turn", line)
    prompt = messages_to_prompt(p, line, "messages", messages[:-1])
    response = assistant_reply(p, line, "messages", messages[-1:])
    label = parse_label(p, line, get_field(p, line, row, "label", optional=True))
    return empty_response(response) or DialogueExample(
        prompt, as_response(response), label, "", source
    )


def completion_row(p: Path, line: int, row: dict, source: str) -> Record | str:
    """TRL prompt-completion row: strings, or prompt messages + one assistant message."""
    if isinstance(row.get("label"), bool):  # TRL unpaired preference (KTO): not a target to copy
        raise DataError(p, "unpaired preference rows (boolean 'label') are not supported", line)
    if isinstance(row.get("prompt"), list):
        prompt = messages_to_prompt(p, line, "prompt", row["prompt"])
        response = assistant_reply(
            p, line, "completion", get_field(p, line, row, "completion", list)
        )
    else:
        prompt = as_prompt(get_field(p, line, row, "prompt"))
        response = get_field(p, line, row, "completion")
    return empty_response(response) or DialogueExample(
        prompt, as_response(response), UNKNOWN, "", source
    )


CONVERTERS: dict[str, Converter] = {
    "preference": preference_row,
    "conversational": conversational_row,
    "transcript": transcript_row,
    "implicit_conversation": implicit_conversation_row,
    "dialogue": dialogue_row,
    "diasafety": diasafety_row,
    "messages": messages_row,
    "completion": completion_row,
}


def converter(name: str | None, key: str = "data.source.row_format") -> Converter | None:
    """The registered converter ``name`` (None: detect from the rows); a ConfigError on ``key``."""
    if name is not None and name not in CONVERTERS:
        raise ConfigError(key, f"expected null or one of {list(CONVERTERS)}")
    return None if name is None else CONVERTERS[name]


def check_limit(limit: int | None, key: str) -> int | None:
    """A ``convert_rows`` limit from the config key ``key``: a positive integer or None."""
    if limit is not None and limit < 1:
        raise ConfigError(key, f"expected a positive integer or null, got {limit}")
    return limit


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


def renamed(rows: Iterable[tuple[int, dict]], columns: Mapping[str, str]) -> Iterator:
    """Rows with ``{field: column}`` applied: each mapped column is read under its field name."""
    for line, row in rows:
        if columns:
            kept = {k: v for k, v in row.items() if k not in columns}
            row = {**kept, **{f: row[c] for f, c in columns.items() if c in row}}
        yield line, row


def convert_rows(
    p: Path,
    rows: Iterable[tuple[int, dict]],
    source: str,
    convert: Converter | None = None,
    limit: int | None = None,
) -> tuple[list[Record], dict[str, int]]:
    """Convert rows with ONE converter (``convert``, else detected from the first row; a later row
    that does not fit it fails on its missing/mistyped field), counting drop reasons. Stops after
    ``limit`` kept records."""
    records: list[Record] = []
    dropped: Counter[str] = Counter()
    n_rows = 0
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


def to_dialogues(records: list[Record]) -> list[Record]:
    """Preference pairs -> (prompt, chosen) dialogues for SFT; dialogues pass through."""
    return [
        DialogueExample(r.prompt, r.chosen, UNKNOWN, "", r.source)
        if isinstance(r, PreferenceExample)
        else r
        for r in records
    ]
