"""Atomic file writes and content hashing: nothing half-written is ever left where it is read back,
and nothing read back is trusted without its recorded digest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file for writing; it replaces ``path`` only when the block exits cleanly."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Hash of JSON-serialisable parts (dict keys sorted); used to key caches and artefacts."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def read_json(path: str | Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


FULL_HASH_BELOW = 64 << 20  # files under 64 MiB are hashed whole when verified
_MIB = 1 << 20


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, streamed 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hash(path: str | Path, length: int = 16) -> str:
    return file_sha256(path)[:length]


def sampled_sha256(path: str | Path) -> str:
    """sha256 of a large file's size, first and last MiB and 16 evenly spaced 64 KiB blocks.

    Reads ~3 MiB whatever the size: catches truncation, a rewritten header or tail, and most
    wholesale overwrites of a multi-GB checkpoint, but not an edit confined to unsampled bytes
    (files under FULL_HASH_BELOW are hashed whole instead; see :func:`file_record`)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    offsets = [0, *(size * i // 17 for i in range(1, 17)), max(0, size - _MIB)]
    with open(path, "rb") as f:
        for i, off in enumerate(offsets):
            f.seek(off)
            h.update(f.read(_MIB if i in (0, len(offsets) - 1) else 64 << 10))
    return h.hexdigest()


def file_record(path: str | Path) -> dict:
    """What a commit records of a file: its size and a sha256, whole below FULL_HASH_BELOW
    (``sha256``), sampled above it (``sampled_sha256``)."""
    size = os.path.getsize(path)
    if size < FULL_HASH_BELOW:
        return {"size": size, "sha256": file_sha256(path)}
    return {"size": size, "sampled_sha256": sampled_sha256(path)}


def verify_record(path: str | Path, rec: dict) -> str | None:
    """None if ``path`` still matches ``rec`` (from :func:`file_record`), else what differs."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return "missing"
    if size != rec.get("size"):
        return f"size {size} bytes, {rec.get('size')} recorded"
    if "sha256" in rec:
        return None if file_sha256(path) == rec["sha256"] else "sha256 differs from the record"
    if "sampled_sha256" in rec:
        ok = sampled_sha256(path) == rec["sampled_sha256"]
        return None if ok else "sampled sha256 differs from the record"
    return "no digest recorded"
