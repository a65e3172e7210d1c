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

Nothing on disk is trusted (issue 14 item 1): the commit records every file's size and sha256 in
DONE (a manifest; files of 64 MiB and more get a sampled digest, see `io.file_record`), and every
reuse checks them first. A stage that fails the check is moved to `<root>/.corrupt/` with a
warning naming the file and recomputed. A job killed after its compute finished but before the
rename leaves a sealed work dir; the next job verifies it and commits it without recomputing.

Key, lock and manifest are `safealign.cache`'s, shared with every other cache; this module adds
what a directory computed by several ranks needs (work dir, OWNER, DONE, rank-aware waits).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from safealign import ranks
from safealign.cache import content_key, dir_manifest, locked, manifest_problem
from safealign.io import read_json, write_json
from safealign.utils import rank_zero

log = logging.getLogger("safealign.pipeline")
DONE, OWNER = "DONE.json", "OWNER.json"
WAIT_S = 48 * 3600.0  # rank 0 may queue behind another job's whole stage before it starts ours


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


def manifest(d: Path) -> dict[str, dict]:
    """Relative path -> size and sha256 (`io.file_record`) of every file in `d` but DONE."""
    return dir_manifest(d, skip=d / DONE)


def _drop_temp_files(d: Path) -> None:
    # Leftovers of atomic writes a killed attempt never renamed (`io.atomic_path` names them
    # `.<name>.<random>.tmp`): never read, so not worth committing or hashing.
    for p in d.rglob(".*.tmp"):
        if p.is_file():
            p.unlink()


class ArtifactStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._checked: dict[Path, tuple[tuple[int, int], str | None]] = {}

    def path(self, stage: str, key: dict) -> Path:
        return self.root / stage / content_key(key)

    def work_dir(self, stage: str, key: dict) -> Path:
        """Where the stage is built: one per key, the same for every rank and every requeue."""
        return self.root / ".work" / f"{stage}-{content_key(key)}"

    def get_or_compute(
        self,
        stage: str,
        key: dict,
        compute: Callable[[Path], None],
        wait_timeout_s: float = WAIT_S,
    ) -> tuple[Path, str]:
        """Return (stage dir, "reused" | "computed"). `compute(work_dir)` writes the outputs; it
        may find a previous attempt's files there (`attempt(work_dir) > 1`) and continue them.
        A committed stage is reused only if its files match the manifest recorded at commit.
        Non-zero ranks raise TimeoutError after `wait_timeout_s` without a sign of rank 0."""
        final, work = self.path(stage, key), self.work_dir(stage, key)
        if self.intact(final):  # status lines: the stage runner's alone (pipeline/stages.py)
            return final, "reused"
        if not rank_zero():
            return self._follow(final, work, compute, wait_timeout_s)
        with locked(self.root / ".locks" / f"{stage}-{final.name}.lock"):
            if self.intact(final):  # another job computed it while we waited
                return final, "reused"
            final.parent.mkdir(parents=True, exist_ok=True)
            if (final / DONE).exists():  # committed, but its files no longer match
                self._set_aside(stage, final)
            if not self._sealed(work):
                self._own(work)
                compute(work)  # an exception leaves the work dir for the next attempt to resume
                _drop_temp_files(work)
                write_json(work / DONE, {"stage": stage, "key": key, "manifest": manifest(work)})
            if final.exists():  # a stale incomplete dir without DONE: replace it
                shutil.rmtree(final)
            os.replace(work, final)
        return final, "computed"

    def intact(self, final: Path) -> bool:
        """True if `final` is committed (DONE) and every file matches its manifest."""
        return (final / DONE).exists() and self._problem(final) is None

    def _problem(self, d: Path) -> str | None:
        """Why the committed dir `d` must not be used, naming the file; None if it verifies.
        Remembered per DONE file (inode, mtime): polling ranks do not re-hash the stage."""
        try:
            st = (d / DONE).stat()
        except OSError:
            return f"{d / DONE} is missing"
        stamp = (st.st_ino, st.st_mtime_ns)
        if d in self._checked and self._checked[d][0] == stamp:
            return self._checked[d][1]
        why = _verify(d)
        self._checked[d] = (stamp, why)
        return why

    def _set_aside(self, stage: str, final: Path) -> None:
        bad = self.root / ".corrupt" / f"{stage}-{final.name}-{time.time_ns()}"
        bad.parent.mkdir(parents=True, exist_ok=True)
        why = self._problem(final)
        os.replace(final, bad)
        log.warning("stage %s: %s; moved the stage to %s, recomputing", stage, why, bad)

    def _sealed(self, work: Path) -> bool:
        """A previous attempt finished its compute and wrote DONE but was killed before the
        rename: commit its verified work instead of computing again."""
        if not (work / DONE).exists():
            return False
        try:
            why = _verify(work) if "manifest" in read_json(work / DONE) else "no manifest"
        except (OSError, ValueError, TypeError) as e:
            why = f"unreadable ({e})"
        if why is None:
            log.warning("committing the finished work of an interrupted attempt in %s", work)
            return True
        log.warning("discarding the DONE marker of %s: %s", work, why)
        (work / DONE).unlink()
        return False

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
        # A stage that fails verification is moved aside by rank 0, which then owns the work
        # dir: every rank reads the same bytes, so all of them reuse or all of them compute.
        claimed = f"rank 0 neither committed {final} nor claimed {work}"
        _wait(lambda: self.intact(final) or _is_my_job(owner(work)), timeout_s, claimed)
        if self.intact(final):
            return final, "reused"
        compute(work)
        _wait((final / DONE).exists, timeout_s, f"rank 0 never committed {final}")
        return final, "computed"


def _verify(d: Path) -> str | None:
    """None if every file of `d`'s DONE manifest matches, else the first mismatch, named."""
    try:
        done = read_json(d / DONE)
    except (OSError, ValueError) as e:
        return f"{d / DONE} is unreadable ({e})"
    files = done.get("manifest") if isinstance(done, dict) else None
    if files is None:  # committed before manifests existed: nothing to check it against
        log.warning("%s has no manifest (committed before issue 14): reused UNVERIFIED; delete "
                    "it to recompute", d)  # fmt: skip
        return None
    return manifest_problem(d, files)
