"""Hash-keyed artefact store: a stage's outputs are computed once and reused by every later run.

A stage directory appears under its final name only when complete. It is built in a work dir
named by the same key (``<root>/.work/<stage>-<hash>``), gets a DONE marker and is renamed in one
step. The work dir is deterministic, so it is shared by every rank of a job (sharded checkpoints
need one dir) and survives a requeue: an interrupted stage is resumed there by the next job (a
fit stage continues from its newest checkpoint), never deleted.

Concurrent jobs (a sweep sharing one SFT stage) serialise on a file lock: one computes, the
others wait and then reuse. Within a job only global rank 0 takes the lock; it writes an OWNER
marker (job id, pid, host, attempt) into the work dir. The other ranks wait until the stage is
DONE (reused) or the OWNER marker names their job, then take part in the (collective)
computation in the same work dir and leave the commit to rank 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from safealign import ranks
from safealign.io import read_json, stable_hash, write_json
from safealign.utils import rank_zero

log = logging.getLogger("safealign.pipeline")
DONE, OWNER = "DONE.json", "OWNER.json"
WAIT_S = 48 * 3600.0  # rank 0 may queue behind another job's whole stage before it starts ours


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def owner(work: Path) -> dict | None:
    """The OWNER marker of a work dir: job, pid, host and `attempt` (1 = fresh, >1 = resumed)."""
    try:
        return read_json(work / OWNER)
    except (FileNotFoundError, ValueError):  # absent, or caught between write and rename
        return None


def attempt(work: Path) -> int:
    """Which attempt at the stage the current compute is: > 1 means a previous job left work."""
    return int((owner(work) or {}).get("attempt", 1))


def _is_my_job(mark: dict | None) -> bool:
    # Same launcher job id (SLURM job/step/restart, torchrun run id), or rank 0 is our parent:
    # Lightning re-executes the command for ranks 1..N-1 only after rank 0 wrote OWNER, and
    # sets MASTER_PORT then, so the ids differ but the parent pid is rank 0's.
    if not mark:
        return False
    job = ranks.job_id()
    return bool(job and mark.get("job") == job) or (
        mark.get("pid") == os.getppid() and mark.get("host") == socket.gethostname()
    )


def _wait(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline, next_note = time.monotonic() + timeout_s, time.monotonic() + 300.0
    while not ready():
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"rank {ranks.global_rank()} gave up after {timeout_s:g}s: {what}")
        if now > next_note:
            log.warning("rank %d still waiting: %s", ranks.global_rank(), what)
            next_note = now + 300.0
        time.sleep(min(1.0, max(0.05, timeout_s / 20)))


class ArtifactStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, stage: str, key: dict) -> Path:
        return self.root / stage / stable_hash(key)

    def work_dir(self, stage: str, key: dict) -> Path:
        """Where the stage is built: one per key, the same for every rank and every requeue."""
        return self.root / ".work" / f"{stage}-{stable_hash(key)}"

    def get_or_compute(
        self,
        stage: str,
        key: dict,
        compute: Callable[[Path], None],
        wait_timeout_s: float = WAIT_S,
    ) -> tuple[Path, str]:
        """Return (stage dir, "reused" | "computed"). `compute(work_dir)` writes the outputs; it
        may find a previous attempt's files there (`attempt(work_dir) > 1`) and continue them.
        Non-zero ranks raise TimeoutError after `wait_timeout_s` without a sign of rank 0."""
        final, work = self.path(stage, key), self.work_dir(stage, key)
        if (final / DONE).exists():
            log.info("stage %-10s reused   %s", stage, final)
            return final, "reused"
        if not rank_zero():
            return self._follow(final, work, compute, wait_timeout_s)
        with _locked(self.root / ".locks" / f"{stage}-{final.name}.lock"):
            if (final / DONE).exists():  # another job computed it while we waited
                log.info("stage %-10s reused   %s", stage, final)
                return final, "reused"
            final.parent.mkdir(parents=True, exist_ok=True)
            self._own(work)
            compute(work)  # an exception leaves the work dir for the next attempt to resume
            write_json(work / DONE, {"stage": stage, "key": key})
            if final.exists():  # a stale incomplete dir without DONE: replace it
                shutil.rmtree(final)
            os.replace(work, final)
        log.info("stage %-10s computed %s", stage, final)
        return final, "computed"

    def _own(self, work: Path) -> None:
        prev = owner(work)
        if prev is not None or (work.is_dir() and any(work.iterdir())):
            log.warning("resuming the interrupted work of %s in %s", (prev or {}).get("job"), work)
        work.mkdir(parents=True, exist_ok=True)
        mark = {"job": ranks.job_id(), "pid": os.getpid(), "host": socket.gethostname()}
        write_json(work / OWNER, mark | {"attempt": attempt(work) + (prev is not None)})

    def _follow(
        self, final: Path, work: Path, compute: Callable[[Path], None], timeout_s: float
    ) -> tuple[Path, str]:
        """A non-zero rank: reuse once rank 0 commits; compute alongside it once it owns `work`."""
        done = final / DONE
        claimed = f"rank 0 neither committed {final} nor claimed {work}"
        _wait(lambda: done.exists() or _is_my_job(owner(work)), timeout_s, claimed)
        if done.exists():
            return final, "reused"
        compute(work)
        _wait(done.exists, timeout_s, f"rank 0 never committed {final}")
        return final, "computed"
