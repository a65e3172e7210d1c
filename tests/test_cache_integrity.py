"""Content-verified caches and stages (issue 14 items 1 and 8): stage keys follow the content of
their input files, committed stages and reference log-prob caches are checked before use, and a
process killed anywhere in compute, commit or a cache write never leaves anything readable that
is incomplete or corrupt."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import safealign.cache
import safealign.io
import safealign.pipeline.store as store_mod
from safealign.cache import DigestCache
from safealign.io import file_record, read_json, verify_record
from safealign.methods import reference as ref
from safealign.pipeline.store import DONE, ArtifactStore

# Two same-size JSONL rows: a changed file keeps its size, so only its content can tell.
ROWS = ['{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n',
        '{"prompt": "hi", "chosen": "howdy", "rejected": "go home"}\n']  # fmt: skip


def _fake_fit(calls: list):
    def fit(s, out_dir: Path, ckpt_path: str | None = None) -> dict:
        calls.append(out_dir)
        (out_dir / "model").mkdir(parents=True, exist_ok=True)
        (out_dir / "model" / "model.safetensors").write_bytes(os.urandom(4096))
        return {}

    return fit


def test_a_data_file_changed_in_place_is_a_new_stage(make_cfg, tmp_path, monkeypatch):
    import safealign.pipeline.stages
    from safealign.pipeline.stages import run_fit_stage, stage_key

    assert len(ROWS[0]) == len(ROWS[1])
    data = tmp_path / "train.jsonl"
    data.write_text(ROWS[0] * 3)
    cfg = make_cfg("data=jsonl", f"data.source.path={data}")
    calls: list[Path] = []
    monkeypatch.setattr(safealign.pipeline.stages, "fit", _fake_fit(calls))
    d1, s1 = run_fit_stage(cfg, "sft", cfg)
    assert (s1, run_fit_stage(cfg, "sft", cfg)) == ("computed", (d1, "reused"))
    assert stage_key(cfg)["input_sha256"] == {"data.source.path": safealign.io.file_sha256(data)}

    data.write_text(ROWS[1] * 3)  # same path, same size, other content
    d2, s2 = run_fit_stage(cfg, "sft", cfg)
    assert s2 == "computed" and d2 != d1 and len(calls) == 2


def test_input_digests_are_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    data = tmp_path / "d" / "train.jsonl"
    data.parent.mkdir()
    data.write_text(ROWS[0])
    old = time.time_ns() - 10**10  # older than the 2 s racy window
    os.utime(data, ns=(old, old))
    first = DigestCache(tmp_path / "digests.json")
    digest = first.content(data.parent)
    first.save()

    def no_reads(path):
        raise AssertionError(f"re-read {path}")

    monkeypatch.setattr(safealign.cache, "file_sha256", no_reads)
    assert DigestCache(tmp_path / "digests.json").content(data.parent) == digest
    data.write_text(ROWS[1])  # new mtime: hashed again
    with pytest.raises(AssertionError, match="re-read"):
        DigestCache(tmp_path / "digests.json").content(data.parent)


def _model_stage(store: ArtifactStore, calls: list) -> tuple[Path, str]:
    def compute(work: Path) -> None:
        calls.append(work)
        (work / "model").mkdir(exist_ok=True)
        (work / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        (work / "model" / "tokenizer.json").write_text('{"vocab": {}}')
        (work / "model" / ".tokenizer.json.x1y2.tmp").write_text("{")  # a killed atomic write

    return store.get_or_compute("sft", {"lr": 1e-3}, compute)


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda p: p.write_bytes(bytes(reversed(range(256))) * 64), "sha256 differs"),
        (lambda p: p.write_bytes(p.read_bytes()[:1000]), "size 1000 bytes, 16384 recorded"),
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["same-size-overwrite", "truncated", "deleted"],
)
def test_a_damaged_stage_is_set_aside_and_recomputed(tmp_path, caplog, damage, why):
    store, calls = ArtifactStore(tmp_path), []
    d, _ = _model_stage(store, calls)
    weights = d / "model" / "model.safetensors"
    assert read_json(d / DONE)["manifest"]["model/model.safetensors"]["size"] == 16384
    damage(weights)
    with caplog.at_level(logging.WARNING, logger="safealign.pipeline"):
        d2, status = _model_stage(ArtifactStore(tmp_path), calls)
    assert (d2, status, len(calls)) == (d, "computed", 2)
    assert weights.read_bytes() == bytes(range(256)) * 64
    msg = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{weights}: {why}" in msg and "recomputing" in msg
    assert len(list((tmp_path / ".corrupt").iterdir())) == 1  # kept aside, not deleted
    assert _model_stage(ArtifactStore(tmp_path), calls) == (d, "reused")


def test_large_files_get_a_sampled_digest(tmp_path, monkeypatch):
    monkeypatch.setattr(safealign.io, "FULL_HASH_BELOW", 1 << 16)
    big = tmp_path / "model.safetensors"
    big.write_bytes(os.urandom(3 << 20))
    rec = file_record(big)
    assert "sampled_sha256" in rec and verify_record(big, rec) is None
    with open(big, "r+b") as f:  # a rewritten first block (the safetensors header)
        f.write(b"\x00" * 16)
    assert verify_record(big, rec) == "sampled sha256 differs from the record"


def test_a_sealed_but_unrenamed_work_dir_is_committed_without_recomputing(tmp_path, monkeypatch):
    store, calls, real = ArtifactStore(tmp_path), [], store_mod.write_json

    def killed_after_done(path, obj) -> None:
        real(path, obj)
        if Path(path).name == DONE:
            raise KeyboardInterrupt  # killed between DONE and the rename

    monkeypatch.setattr(store_mod, "write_json", killed_after_done)
    with pytest.raises(KeyboardInterrupt):
        _model_stage(store, calls)
    monkeypatch.undo()
    assert (store.work_dir("sft", {"lr": 1e-3}) / DONE).exists()
    d, status = _model_stage(ArtifactStore(tmp_path), calls)
    assert status == "computed" and len(calls) == 1 and store.intact(d)
    assert sorted(read_json(d / DONE)["manifest"]) == [
        "OWNER.json", "model/model.safetensors", "model/tokenizer.json"]  # fmt: skip


def _ref_tensors(value: float = -3.0) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "train": {"chosen": torch.linspace(-50, -1, 6), "rejected": torch.full((6,), value)},
        "val": {"chosen": torch.tensor([-2.5, -7.0]), "rejected": torch.tensor([-1.0, -9.0])},
    }


SIZES = {"train": 6, "val": 2}


def test_reference_cache_round_trips(tmp_path):
    path = tmp_path / "reflogps-k.safetensors"
    ref.save_cache(path, "k", _ref_tensors())
    got = ref.load_cache(path, "k", SIZES)
    torch.testing.assert_close(got, _ref_tensors())
    assert ref.load_cache(path, "other-key", SIZES) is None


def test_reference_cache_rewritten_under_its_old_metadata_is_recomputed(tmp_path, caplog):
    from safetensors.torch import safe_open

    path = tmp_path / "reflogps-k.safetensors"
    ref.save_cache(path, "k", _ref_tensors())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    flat = {k: torch.full_like(t, -1.0) for k, t in load_file(str(path)).items()}  # plausible
    save_file(flat, str(path), metadata=meta)
    with caplog.at_level(logging.WARNING):
        assert ref.load_cache(path, "k", SIZES) is None
    assert f"{path}: tensors differ from their sha256" in caplog.text


@pytest.mark.parametrize(
    "value, why", [(float("nan"), "non-finite"), (float("inf"), "non-finite"), (2.0, "positive")]
)
def test_implausible_reference_log_probs_are_recomputed(tmp_path, caplog, value, why):
    path = tmp_path / "reflogps-k.safetensors"
    ref.save_cache(path, "k", _ref_tensors(value))  # a consistent sha256: only sanity catches it
    with caplog.at_level(logging.WARNING):
        assert ref.load_cache(path, "k", SIZES) is None
    assert str(path) in caplog.text and "train/rejected has" in caplog.text and why in caplog.text


def test_reference_cache_without_a_sha256_is_recomputed(tmp_path):
    path = tmp_path / "reflogps-k.safetensors"
    flat = {f"{s}/{f}": t for s, fs in _ref_tensors().items() for f, t in fs.items()}
    save_file(flat, str(path), metadata={"key": "k"})  # written before issue 14
    assert ref.load_cache(path, "k", SIZES) is None


def test_embedding_cache_not_matching_its_sha256_is_recomputed(tmp_path):
    from safealign.isaac.encoder import TfidfSvdEncoder, embed_cached

    texts = ["a cat", "a dog", "the cat sat"]
    enc = TfidfSvdEncoder(dim=2, seed=0)
    good = embed_cached(texts, enc, tmp_path)
    (npz,) = tmp_path.glob("emb-*.npz")
    with np.load(npz) as z:
        meta = {n: z[n] for n in z.files if n.startswith("meta.")}  # the key and sha256 as read
    np.savez(npz, emb=np.full_like(good, 0.5), **meta)  # valid .npz, other numbers
    np.testing.assert_array_equal(embed_cached(texts, enc, tmp_path), good)


# --- kill during compute, commit and cache writes (item 8) -----------------------------------

FILES = {"model/model.safetensors": 48 << 10, "tokenizer.json": 8 << 10, "metrics.json": 512,
         "checkpoints/last.ckpt": 32 << 10}  # fmt: skip


def _expected(name: str) -> bytes:
    return random.Random(name).randbytes(FILES[name])


def _compute(work: Path, mark=None) -> None:
    """Writes each file in 8 chunks, not atomically: a kill leaves half-written files."""
    for name in FILES:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        data, step = _expected(name), -(-FILES[name] // 8)
        with open(work / name, "wb") as f:
            for i in range(0, len(data), step):
                if mark:
                    mark(f"compute {name}")
                    time.sleep(0.004)
                f.write(data[i : i + step])
                f.flush()


def _child(root: Path, key: dict, started, phases: Path) -> None:
    fd = os.open(phases, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def mark(phase: str) -> None:
        os.write(fd, f"{phase}\n".encode())

    real_record, real_write = safealign.cache.file_record, store_mod.write_json

    def slow_record(path):  # stretch the commit so kills land inside it
        mark("commit: manifest")
        time.sleep(0.01)
        return real_record(path)

    def slow_write(path, obj):
        real_write(path, obj)
        if Path(path).name == DONE:  # sealed: the next call commits without recomputing
            mark("commit: sealed")
            time.sleep(0.03)

    safealign.cache.file_record, store_mod.write_json = slow_record, slow_write
    started.set()
    ArtifactStore(root).get_or_compute("sft", key, lambda w: _compute(w, mark))
    mark("cache: save")
    ref.save_cache(root / "ref" / f"reflogps-{key['trial']}.safetensors", "k", _ref_tensors())
    mark("end")


def _run_killed(ctx, root: Path, key: dict, delay: float | None, phases: Path) -> float:
    started = ctx.Event()
    p = ctx.Process(target=_child, args=(root, key, started, phases))
    t0 = time.monotonic()
    p.start()
    assert started.wait(30)
    t1 = time.monotonic()
    if delay is not None:
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode in ((0,) if delay is None else (0, -signal.SIGKILL))
    return time.monotonic() - max(t0, t1)


@pytest.mark.slow
def test_kills_anywhere_in_compute_and_commit_never_leave_a_corrupt_artefact(tmp_path):
    """>= 20 SIGKILLs at seeded random points of compute, commit and the reference cache write;
    the next call reuses a complete verified stage or recomputes, never returns a partial one."""
    ctx, rng = multiprocessing.get_context("fork"), random.Random(14)
    window = _run_killed(ctx, tmp_path, {"trial": -1}, None, tmp_path / "calibration.log")
    seen_phases, statuses = [], []
    for trial in range(24):
        key, phases = {"trial": trial}, tmp_path / f"phases-{trial}.log"
        _run_killed(ctx, tmp_path, key, rng.uniform(0, 1.1 * window), phases)
        lines = phases.read_text().splitlines() or ["start"]
        seen_phases.append(lines[-1].split(" ")[0])

        cache = ref.load_cache(tmp_path / "ref" / f"reflogps-{trial}.safetensors", "k", SIZES)
        if cache is not None:
            torch.testing.assert_close(cache, _ref_tensors())
        store = ArtifactStore(tmp_path)
        d, status = store.get_or_compute("sft", key, _compute)
        statuses.append(status)
        assert d == store.path("sft", key) and store.intact(d)
        for name in FILES:
            assert (d / name).read_bytes() == _expected(name), (trial, lines[-1:], name)
    assert len(set(seen_phases)) >= 3, seen_phases  # kills landed in compute, commit and cache
    assert {"computed", "reused"} <= set(statuses), statuses
