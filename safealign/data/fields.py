"""Checked access to one row's fields, and the text conventions every converter shares.

Each function takes the file ``p`` and the row's ``line`` only to name them in a DataError.
Prompts follow the project convention (``types.chat_prompt``: user/assistant turns ending with
``"\\n\\nAssistant:"``); TRL chat messages are mapped onto it here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safealign.data.readers import kind_of
from safealign.errors import DataError
from safealign.types import ASSISTANT_TAG, HUMAN_TAG, LABELS, UNKNOWN, chat_prompt

_ROLES = ("system", "user", "assistant")


def get_field(p: Path, line: int, row: dict, key: str, kind: type = str, optional: bool = False):
    """``row[key]`` checked to be of ``kind``; an optional field may be absent or null (-> None)."""
    value = row.get(key)
    if value is None:
        if optional:
            return None
        what = "missing field" if key not in row else "null field"
        raise DataError(p, f"{what} '{key}' (row has keys {sorted(row)})", line)
    if not isinstance(value, kind):
        raise DataError(p, f"field '{key}' must be {kind_of(kind())}, got {kind_of(value)}", line)
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


def parse_label(p: Path, line: int, value: str | None) -> str:
    label = UNKNOWN if value is None else value.strip().lower()
    if label not in LABELS:
        raise DataError(p, f"field 'label' must be one of {LABELS} (any case), got {value!r}", line)
    return label


def row_prompt(p: Path, line: int, row: dict) -> str:
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
