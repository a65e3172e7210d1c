"""The train loader: resumable mid-epoch with the exact batch order (tests/test_resume.py).

`ResumableDataLoader` implements Lightning's `state_dict`/`load_state_dict` loader protocol: it
stores the shuffling generator's state at the start of the epoch and the number of batches handed
out, so a restart regenerates the same permutation and skips the consumed batches. (Without it,
Lightning restarts a mid-epoch resume at the first batch of the epoch.) Checkpointing on a stop
signal and choosing the checkpoint to resume from live in safealign.resume.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning can checkpoint and restore mid-epoch (exact batch order).

    No `__init__` override: Lightning re-creates loaders from their constructor arguments (e.g.
    to insert a DistributedSampler), so the state lives in lazily-set attributes.
    """

    _resume: dict | None = None
    _started: dict | None = None  # the state the current iterator started from
    _epoch_start: torch.Tensor | None = None
    _served = 0

    def __iter__(self):
        state, self._resume = self._resume, None
        if state is None and self._served == 0 and self._started is not None:
            # The previous iterator was dropped before its first batch: Lightning does so when
            # it resumes from a checkpoint taken after an epoch's last batch (at the end of
            # validation). Start again from where it started, or that dropped iterator's draws
            # would shift every later epoch's order.
            state = self._started
        if state and self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        self._epoch_start = self.generator.get_state() if self.generator is not None else None
        self._started = {
            "batches": state["batches"] if state else 0,
            "generator": self._epoch_start,
        }
        self._served = 0
        # super().__iter__ draws the worker base seed from the generator now and the sampler's
        # permutation at the first batch: both come after the state captured above.
        return self._serve(super().__iter__(), self._started["batches"])

    def _serve(self, it, skip: int):
        for batch in it:
            self._served += 1
            if self._served > skip:
                yield batch

    def state_dict(self) -> dict[str, Any]:
        gen = self.generator.get_state() if self.generator is not None else None
        if self._epoch_start is None or self._served >= len(self):
            # not started, or the epoch is complete: the next epoch starts from the current state
            return {"batches": 0, "generator": gen}
        return {"batches": self._served, "generator": self._epoch_start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict)
