"""Hash-keyed artefact store: a stage's outputs are computed once and reused by every later run.

A stage directory appears under its final name only when complete: it is built in a temp dir,
gets a DONE marker, and is renamed in one step. An interrupted stage leaves only a temp dir,
which is never read and is redone next time.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safealign.io import stable_hash, write_json

log = logging.getLogger("safealign.pipeline")
DONE = "DONE.json"


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
