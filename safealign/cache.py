"""One content-keyed cache for every expensive result (issue 13; integrity: issue 14 item 1).

Six caches use it: pipeline stages (`pipeline.store`, a directory per entry), reference log-probs
(`methods.reference`), text embeddings (`isaac.encoder`), ISAAC neighbourhoods (`isaac.prepare`),
BPE tokenizers (`models.tokenizer`) and resumable generation (`gen_cache`). Every entry is

* named by a content key (:func:`content_key`) of what determines it, never by where its inputs
  or the cache itself live (:func:`without_cache_dirs`);
* written to a temp path beside it and renamed, so a reader sees all of it or nothing;
* recorded with a digest of its content (a file's `key` and `sha256` stored inside it,
  :class:`FileCache`; a directory's manifest, :func:`dir_manifest`) and checked against it on
  every read: a corrupt, partial or stale entry is recomputed with a warning naming the file;
* computed under an advisory file lock (:func:`locked`), so concurrent ranks or jobs compute once
  and the others reuse it.

:class:`DigestCache` remembers the sha256 of input files by (path, size, mtime), so the content
keys of stages that read gigabytes of data do not re-read them on every run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from safealign.io import (
    atomic_path,
    file_record,
    file_sha256,
    read_json,
    stable_hash,
    verify_record,
    write_json,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
Check = Callable[[Any], "str | None"]  # why a value read back cannot be used, or None


def content_key(*parts: Any, length: int = 16) -> str:
    """The key of a cache entry: a hash of the JSON of everything that determines its value."""
    return stable_hash(*parts, length=length)


def without_cache_dirs(obj: Any) -> Any:
    """`obj` (plain dicts/lists or an OmegaConf config, unresolved) without any `cache_dir` key.

    Caches are content-keyed: where one lives never changes what it holds, so a fresh clone
    elsewhere or a tmp cache dir reuses the same stages and checkpoints (stage keys, run
    fingerprints)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, DictConfig | ListConfig):  # interpolations stay unresolved strings
        return OmegaConf.create(without_cache_dirs(OmegaConf.to_container(obj, resolve=False)))
    if isinstance(obj, dict):
        return {k: without_cache_dirs(v) for k, v in obj.items() if k != "cache_dir"}
    if isinstance(obj, list):
        return [without_cache_dirs(v) for v in obj]
    return obj


def _same_file(f, path: Path) -> bool:
    try:
        st, mine = os.stat(path), os.fstat(f.fileno())
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on the lock file `path`, removed on release.

    A waiter that wakes on a removed lock file locks the new one instead (checked by inode), so
    removing it never lets two holders in; a killed holder's lock dies with its process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a")  # noqa: SIM115 - closed on release below
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except BaseException:
            f.close()
            raise
        if _same_file(f, path):
            break
        f.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        f.close()  # releases the lock


def arrays_sha256(named: dict[str, Any]) -> str:
    """sha256 of named numpy arrays or torch tensors: names, dtypes, shapes and bytes, in name
    order (a tensor hashes as it always did for the reference cache: dtype `torch.float32`)."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(named):
        a = named[name]
        if hasattr(a, "detach"):  # torch: raw bytes of any dtype (bf16 has no numpy twin)
            import torch

            t = a.detach().cpu().contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        else:
            t = np.ascontiguousarray(a)
            raw = t.tobytes()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(raw)
    return h.hexdigest()


@dataclass(frozen=True)
class FileFormat(Generic[T]):
    """How one cache keeps a value and its record (`key`, `sha256`) in ONE file, so a single
    rename commits both. `load` raises on anything unreadable; `digest` hashes a value."""

    save: Callable[[Path, T, dict[str, str]], None]
    load: Callable[[Path], tuple[T, dict[str, str]]]
    digest: Callable[[T], str]
    noun: str = "contents"  # named in "<noun> differ from their sha256"


class FileCache(Generic[T]):
    """Single-file entries in `fmt`; `what` and `redo` name them in warnings ("cached tokenizer
    <path>: <why>; retraining it")."""

    def __init__(self, fmt: FileFormat[T], what: str, redo: str = "recomputing") -> None:
        self.fmt, self.what, self.redo = fmt, what, redo

    def load(self, path: Path, key: str, check: Check | None = None, warn: bool = True) -> T | None:
        """The value at `path`, or None when absent, unreadable, recorded for another key, not
        the value saved (its sha256) or rejected by `check` (shapes, ranges, plausibility)."""
        if not path.exists():
            return None
        try:
            value, meta = self.fmt.load(path)
            why = self._problem(value, meta, key) or (check(value) if check else None)
        except Exception as e:  # noqa: BLE001 - any unreadable entry is recomputed, never used
            value, why = None, f"unreadable ({type(e).__name__}: {e})"
        if why is None:
            return value
        if warn:
            log.warning("%s %s: %s; %s", self.what, path, why, self.redo)
        return None

    def _problem(self, value: T, meta: dict[str, str], key: str) -> str | None:
        if meta.get("key") != key:
            return f"recorded for key {meta.get('key')!r}, not {key!r}"
        if "sha256" not in meta:
            return "no sha256 recorded"
        if meta["sha256"] != self.fmt.digest(value):
            return f"{self.fmt.noun} differ from their sha256"
        return None

    def save(self, path: Path, key: str, value: T) -> None:
        """Write `value` with its key and sha256 atomically, under the entry's lock."""
        with locked(lock_path(path)):
            self._write(path, key, value)

    def _write(self, path: Path, key: str, value: T) -> None:
        with atomic_path(path) as tmp:
            self.fmt.save(tmp, value, {"key": key, "sha256": self.fmt.digest(value)})

    def get_or_compute(
        self, path: Path | None, key: str, compute: Callable[[], T], check: Check | None = None
    ) -> T:
        """The verified entry at `path`, else `compute()` written there (None: no cache). A
        valid entry is read without the lock; concurrent computers of one entry queue on it."""
        if path is None:
            return compute()
        if (hit := self.load(path, key, check, warn=False)) is not None:
            return hit
        with locked(lock_path(path)):
            if (hit := self.load(path, key, check)) is not None:  # another job wrote it
                return hit
            value = compute()
            self._write(path, key, value)
        return value


def lock_path(path: Path) -> Path:
    """The lock file of the entry at `path`: hidden beside it, gone when nobody holds it."""
    return path.with_name(f".{path.name}.lock")


def _save_npz(path: Path, arrays: dict[str, Any], meta: dict[str, str]) -> None:
    import numpy as np

    records = {f"meta.{k}": np.array(v) for k, v in meta.items()}
    with open(path, "wb") as f:
        np.savez(f, **arrays, **records)


def _load_npz(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    import numpy as np

    with np.load(path, allow_pickle=False) as z:  # never unpickle what is read back
        items = {name: z[name] for name in z.files}
    meta = {n.removeprefix("meta."): str(a) for n, a in items.items() if n.startswith("meta.")}
    return {n: a for n, a in items.items() if not n.startswith("meta.")}, meta


NPZ: FileFormat[dict[str, Any]] = FileFormat(_save_npz, _load_npz, arrays_sha256, "arrays")


def dir_manifest(d: Path, skip: Path | None = None) -> dict[str, dict]:
    """Relative path -> size and sha256 (`io.file_record`) of every file in `d` but `skip`."""
    files = sorted(p for p in d.rglob("*") if p.is_file())
    return {p.relative_to(d).as_posix(): file_record(p) for p in files if p != skip}


def manifest_problem(d: Path, files: dict[str, dict]) -> str | None:
    """None if every file of the manifest `files` still matches in `d`, else the first
    mismatch, named."""
    for rel, rec in files.items():
        if (why := verify_record(d / rel, rec)) is not None:
            return f"{d / rel}: {why}"
    return None


def _entry(v) -> bool:
    return isinstance(v, dict) and {"size", "mtime_ns", "sha256"} <= v.keys()


class DigestCache:
    """Full sha256 of input files and dirs, remembered by (path, size, mtime_ns) in a JSON file so
    a rerun does not re-read gigabytes of unchanged data.

    A file modified in the last 2 s is hashed but not remembered: on a file system with coarse
    mtimes a second same-size write could keep the same mtime (git's "racily clean" rule)."""

    RACY_NS = 2_000_000_000

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict] = {}
        self.fresh: dict[str, dict] = {}
        self.dirty = False
        if self.path is not None and self.path.exists():
            with contextlib.suppress(OSError, ValueError, AttributeError):  # broken: only slower
                self.entries = {k: v for k, v in read_json(self.path).items() if _entry(v)}

    def file(self, path: Path) -> str:
        st, name = path.stat(), str(path.resolve())
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        for known in (self.entries, self.fresh):  # fresh: racy files, this process only
            hit = known.get(name)
            if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
                return hit["sha256"]
        digest = file_sha256(path)
        if time.time_ns() - st.st_mtime_ns > self.RACY_NS:
            self.entries[name], self.dirty = stamp | {"sha256": digest}, True
        else:
            self.fresh[name] = stamp | {"sha256": digest}
        return digest

    def content(self, path: str | Path) -> str:
        """sha256 of a file, or of a dir's sorted (relative path, file sha256) pairs."""
        path = Path(path)
        if path.is_file():
            return self.file(path)
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\x00{self.file(f)}\x00".encode())
        return h.hexdigest()

    def save(self) -> None:
        if self.path is not None and self.dirty:  # merged: concurrent runs add their own files
            with locked(lock_path(self.path)):
                write_json(self.path, DigestCache(self.path).entries | self.entries)
            self.dirty = False
