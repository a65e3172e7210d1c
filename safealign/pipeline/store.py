"""Hash-keyed artefact store: a stage's outputs are computed once and reused by every later run.

A stage directory appears under its final name only when complete: it is built in a temp dir,
gets a DONE marker, and is renamed in one step. An interrupted stage leaves only a temp dir,
which is never read and is redone next time. Concurrent jobs (a sweep sharing one SFT stage)
serialise on a file lock: one computes, the others wait and then reuse. Under multi-process DDP
every rank runs the stage's fit, but only rank zero commits; the others wait for its DONE.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from safealign.io import stable_hash, write_json
from safealign.utils import rank_zero

log = logging.getLogger("safealign.pipeline")
DONE = "DONE.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wait_for(done: Path, timeout_s: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank-zero never committed {done.parent}")
        time.sleep(1.0)


class ArtifactStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, stage: str, key: dict) -> Path:
        return self.root / stage / stable_hash(key)

    def get_or_compute(self, stage: str, key: dict, compute: Callable[[Path], None]) -> tuple[Path, str]:
        """Return (stage dir, "reused" | "computed"). `compute(tmp_dir)` writes the outputs."""
        final = self.path(stage, key)
        if (final / DONE).exists():
            log.info("stage %-10s reused   %s", stage, final)
            return final, "reused"
        if not rank_zero():  # take part in the (collective) computation, never commit
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.root) as tmp:
                compute(Path(tmp))
            _wait_for(final / DONE)
            return final, "computed"
        with _locked(self.root / ".locks" / f"{stage}-{final.name}.lock"):
            if (final / DONE).exists():  # another job computed it while we waited
                log.info("stage %-10s reused   %s", stage, final)
                return final, "reused"
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
            try:
                compute(tmp)
                write_json(tmp / DONE, {"stage": stage, "key": key})
                if final.exists():  # a stale incomplete dir without DONE: replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        log.info("stage %-10s computed %s", stage, final)
        return final, "computed"
