"""Artefact store (issue 9 item 5): one deterministic work dir per stage key, shared by the ranks
of a job and resumed (never deleted) after an interruption; concurrent jobs compute once."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from safealign.pipeline.store import DONE, OWNER, ArtifactStore, attempt, owner

_RANK_KEYS = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID",
              "MASTER_PORT", "MASTER_ADDR", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # fmt: skip


@pytest.fixture
def env(monkeypatch):
    for k in _RANK_KEYS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_interrupted_stage_is_resumed_in_the_same_work_dir(env, tmp_path):
    store, key = ArtifactStore(tmp_path), {"stage": "sft", "lr": 1e-3}
    seen: list[tuple[Path, int]] = []

    def crash(work: Path) -> None:
        seen.append((work, attempt(work)))
        (work / "step-100.ckpt").write_text("half way")
        raise KeyboardInterrupt  # the job is killed mid-stage

    with pytest.raises(KeyboardInterrupt):
        store.get_or_compute("sft", key, crash)
    work = store.work_dir("sft", key)
    assert work.is_dir() and (work / "step-100.ckpt").exists()  # kept for the requeued job
    assert not store.path("sft", key).exists() and owner(work)["attempt"] == 1

    def finish(work: Path) -> None:
        seen.append((work, attempt(work)))
        assert (work / "step-100.ckpt").read_text() == "half way"  # the first attempt's file
        (work / "model.txt").write_text("done")

    d, status = store.get_or_compute("sft", key, finish)
    assert status == "computed" and d == store.path("sft", key)
    assert [a for _, a in seen] == [1, 2]  # compute is told it resumes
    assert seen[0][0] == seen[1][0] == work  # deterministic: the same dir both times
    assert (d / "model.txt").exists() and (d / "step-100.ckpt").exists() and (d / DONE).exists()
    assert not work.exists()  # renamed onto the final name in one step
    assert store.get_or_compute("sft", key, lambda w: 1 / 0) == (d, "reused")


def test_stale_final_dir_without_done_is_replaced(env, tmp_path):
    store, key = ArtifactStore(tmp_path), {"k": 1}
    final = store.path("judge", key)
    final.mkdir(parents=True)
    (final / "junk").write_text("x")
    d, status = store.get_or_compute("judge", key, lambda w: (w / "ok").write_text("1"))
    assert status == "computed" and sorted(p.name for p in d.iterdir()) == [DONE, OWNER, "ok"]


def test_concurrent_callers_compute_once(env, tmp_path):
    calls, results = [], []

    def slow(work: Path) -> None:
        calls.append(work)
        time.sleep(0.3)
        (work / "out").write_text("1")

    def job() -> None:  # each call opens the lock file itself: flock excludes the other thread
        results.append(ArtifactStore(tmp_path).get_or_compute("generate", {"k": 2}, slow))

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(calls) == 1 and len(results) == 3
    assert sorted(s for _, s in results) == ["computed", "reused", "reused"]
    assert len({d for d, _ in results}) == 1


def _commit_later(store: ArtifactStore, stage: str, key: dict, delay: float) -> threading.Thread:
    def commit() -> None:  # what rank 0 does after its compute: DONE, then the rename
        time.sleep(delay)
        work, final = store.work_dir(stage, key), store.path(stage, key)
        (work / DONE).write_text("{}")
        final.parent.mkdir(parents=True, exist_ok=True)
        work.rename(final)

    t = threading.Thread(target=commit)
    t.start()
    return t


def _claim(store: ArtifactStore, stage: str, key: dict, **mark) -> Path:
    work = store.work_dir(stage, key)
    work.mkdir(parents=True)
    (work / OWNER).write_text(json.dumps({"attempt": 1, **mark}))
    return work


def test_slurm_rank_1_computes_in_rank_0s_work_dir_and_waits_for_its_commit(env, tmp_path):
    for k, v in {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "9"}.items():
        env.setenv(k, v)
    store, key = ArtifactStore(tmp_path), {"k": 3}
    work = _claim(store, "sft", key, job="slurm-9--0", pid=1, host="node0")
    got = []
    committer = _commit_later(store, "sft", key, delay=0.5)
    d, status = store.get_or_compute("sft", key, got.append, wait_timeout_s=10)
    committer.join()
    assert got == [work] and (d, status) == (store.path("sft", key), "computed")


def test_lightning_child_joins_its_parents_work_dir(env, tmp_path):
    env.setenv("LOCAL_RANK", "1")  # Lightning's popen child of this process' parent
    env.setenv("WORLD_SIZE", "2")
    env.setenv("MASTER_PORT", "12345")  # set by the launcher after rank 0 wrote OWNER
    store, key = ArtifactStore(tmp_path), {"k": 4}
    work = _claim(store, "sft", key, job="", pid=os.getppid(), host=socket.gethostname())
    got = []
    committer = _commit_later(store, "sft", key, delay=0.3)
    assert store.get_or_compute("sft", key, got.append, wait_timeout_s=10)[1] == "computed"
    committer.join()
    assert got == [work]


def test_non_zero_rank_never_joins_another_jobs_stale_work(env, tmp_path):
    for k, v in {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "10"}.items():
        env.setenv(k, v)
    store, key = ArtifactStore(tmp_path), {"k": 5}
    _claim(store, "sft", key, job="slurm-9--0", pid=1, host="elsewhere")  # an interrupted job
    with pytest.raises(TimeoutError, match="never committed|nor claimed"):
        store.get_or_compute("sft", key, lambda w: pytest.fail("computed"), wait_timeout_s=0.3)
    _commit_later(store, "sft", key, delay=0.0).join()  # once committed, the rank reuses it
    assert store.get_or_compute("sft", key, lambda w: 1 / 0)[1] == "reused"


def test_a_requeued_fit_stage_continues_from_its_newest_checkpoint(env, make_cfg, monkeypatch):
    import safealign.pipeline.stages
    from safealign.pipeline.stages import run_fit_stage, stage_config

    cfg = make_cfg("experiment=dpo_builtin", "init.data.source.size=200")
    calls: list[tuple[Path, str | None]] = []

    def fake_fit(s, out_dir: Path, ckpt_path: str | None = None) -> dict:
        calls.append((out_dir, ckpt_path))
        assert Path(s.paths.output_dir) == out_dir  # checkpoints and exports in the work dir
        ckpts = out_dir / "checkpoints"
        ckpts.mkdir(parents=True, exist_ok=True)
        if len(calls) == 1:
            (ckpts / "last.ckpt").write_text("step 50")
            raise SystemExit(143)  # SIGTERM'd by the scheduler, requeued
        return {}

    monkeypatch.setattr(safealign.pipeline.stages, "fit", fake_fit)
    scfg = stage_config(cfg, cfg.init)
    with pytest.raises(SystemExit):
        run_fit_stage(cfg, "sft", scfg)
    d, status = run_fit_stage(cfg, "sft", scfg)
    (work1, ckpt1), (work2, ckpt2) = calls
    assert work1 == work2 and ckpt1 is None and ckpt2 == str(work1 / "checkpoints" / "last.ckpt")
    assert status == "computed" and (d / "checkpoints" / "last.ckpt").exists()
