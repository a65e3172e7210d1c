"""The resumable cache of one :func:`safealign.generation.generate` call: ``<out>.partial``.

Prompts are processed in chunks; each finished chunk is appended to ``<out>.partial`` (one write,
flush, fsync). A header line records the content key of the settings (:func:`run_key`: seed,
sampling config without ``batch_size``, prompts); a restart with the same settings keeps the
prompts whose rows are all present (a torn last line is ignored) and generates only the rest. The
model is not in the key: resume a partial file only with the model that started it. The final
file is written atomically and the partial file removed. The whole call holds the partial file's
lock (`safealign.cache.locked`), so two jobs never append to one file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safealign.cache import content_key, lock_path, locked
from safealign.errors import DataError
from safealign.io import atomic_open, write_jsonl

log = logging.getLogger(__name__)


def run_key(seed: int, sampling: Any, prompts: list[str]) -> str:
    """Content key of a generation run (``sampling``: a ``generation.SamplingConfig``)."""
    settings = asdict(sampling) | {"temperatures": [float(t) for t in sampling.temperatures]}
    settings.pop("batch_size")  # outputs do not depend on it: resuming with another size is fine
    return content_key(seed, settings, prompts, "generation-v1")


class PartialFile:
    """``<out>.partial``: a header with the run key, then one JSON row per line."""

    def __init__(self, path: Path, key: str, per_prompt: int) -> None:
        self.path, self.key, self.per_prompt = path, key, per_prompt

    def resume(self) -> dict[int, list[dict]]:
        """Rows of the fully finished prompts, by prompt id; the file is rewritten with only them
        (no torn tail) so chunks can be appended."""
        done = self._load()
        with atomic_open(self.path) as f:
            f.write(json.dumps({"__header__": {"fingerprint": self.key}}) + "\n")
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for pid in sorted(done)
                         for r in done[pid])  # fmt: skip
        return done

    def _load(self) -> dict[int, list[dict]]:
        """{} if absent or from other settings; DataError on corruption before the last line."""
        if not self.path.exists():
            return {}
        lines = self.path.read_text(encoding="utf-8").split("\n")
        try:
            header = json.loads(lines[0])["__header__"]
        except (json.JSONDecodeError, KeyError, TypeError):
            header = None
        if header is None or header.get("fingerprint") != self.key:
            log.warning("%s was written with other settings; starting over", self.path)
            return {}
        done: dict[int, list[dict]] = {}
        for n, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if n == len(lines) or (n == len(lines) - 1 and not lines[-1]):
                    break  # torn last line from a crash mid-write: that chunk is redone
                raise DataError(
                    self.path, f"corrupt JSON in the middle of a partial file: {e}", line=n
                ) from e
            if not isinstance(row, dict) or not isinstance(row.get("prompt_id"), int):
                raise DataError(self.path, "expected a generation row with an integer prompt_id",
                                line=n)  # fmt: skip
            done.setdefault(row["prompt_id"], []).append(row)
        return {pid: rows for pid, rows in done.items() if len(rows) == self.per_prompt}

    def append(self, rows: list[dict]) -> None:
        """Make one finished chunk durable: one write, flush, fsync."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())

    def commit(self, out_path: str | Path, rows: list[dict]) -> None:
        """Write the final file atomically, then drop the partial one."""
        write_jsonl(out_path, rows)
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def resumable(
    out_path: str | Path | None, seed: int, sampling: Any, prompts: list[str]
) -> Iterator[PartialFile | None]:
    """The locked partial file of a run writing `out_path` (None: no file, nothing to resume)."""
    if out_path is None:
        yield None
        return
    path = Path(f"{out_path}.partial")
    per_prompt = len(sampling.temperatures) * sampling.n_samples
    with locked(lock_path(path)):
        yield PartialFile(path, run_key(seed, sampling, prompts), per_prompt)
