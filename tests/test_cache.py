"""safealign.cache: the one content-keyed cache (key, verified read, atomic write, lock)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
from omegaconf import OmegaConf

from safealign.cache import NPZ, FileCache, arrays_sha256, lock_path, locked, without_cache_dirs


def test_file_cache_computes_once_and_rejects_what_it_did_not_write(tmp_path, caplog):
    cache, path, calls = FileCache(NPZ, "test cache"), tmp_path / "x.npz", []

    def compute() -> dict:
        calls.append(1)
        return {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}

    first = cache.get_or_compute(path, "k", compute)
    again = cache.get_or_compute(path, "k", compute)
    np.testing.assert_array_equal(first["a"], again["a"])
    assert len(calls) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]

    other = {"a": np.zeros((2, 3), np.float32)}
    NPZ.save(path, other, {"key": "k", "sha256": arrays_sha256(first)})  # old sha256, new numbers
    with caplog.at_level(logging.WARNING):
        assert cache.load(path, "k") is None
    assert f"test cache {path}: arrays differ from their sha256; recomputing" in caplog.text
    NPZ.save(path, other, {"key": "k", "sha256": arrays_sha256(other)})
    assert cache.load(path, "other") is None  # recorded for another key
    assert cache.load(path, "k", check=lambda v: "all zero" if not v["a"].any() else None) is None
    path.write_bytes(b"PK\x03\x04 not a zip")
    np.testing.assert_array_equal(cache.get_or_compute(path, "k", compute)["a"], first["a"])
    assert len(calls) == 2


def test_lock_excludes_and_leaves_no_file(tmp_path):
    lock, inside, overlaps = tmp_path / ".x.lock", [], []

    def hold() -> None:
        with locked(lock):
            inside.append(1)
            overlaps.append(len(inside))
            time.sleep(0.02)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1] * 6 and not lock.exists()
    assert lock_path(tmp_path / "bpe-k.json") == tmp_path / ".bpe-k.json.lock"


def test_without_cache_dirs_plain_and_config_unresolved():
    plain = {"a": 1, "cache_dir": "/x", "m": [{"cache_dir": "/y", "b": 2}]}
    assert without_cache_dirs(plain) == {"a": 1, "m": [{"b": 2}]}
    cfg = OmegaConf.create({"p": {"c": "/c"}, "m": {"cache_dir": "${p.c}", "x": "${p.c}/z"}})
    out = without_cache_dirs(cfg)
    assert "cache_dir" not in out.m and out.m.x == "/c/z"
    assert OmegaConf.to_container(out.m, resolve=False) == {"x": "${p.c}/z"}
