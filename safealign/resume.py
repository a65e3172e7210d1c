"""Resume: which checkpoint a run continues from, a checkpoint at a batch boundary when the job is
told to stop, and a train loader that restarts mid-epoch exactly where it stopped.

Re-running the same command (same output dir) with `ckpt_path=auto` continues from the newest
checkpoint, and the final weights equal those of an uninterrupted run (tests/test_resume.py):

* `CheckpointOnSignal` saves `last.ckpt` when the run is stopped: on SIGTERM via Lightning's own
  graceful stop (it finishes the batch, then raises `SIGTERMException`), and on the scheduler's
  early-warning signal (submitit: SIGUSR2, `signal_delay_s` before the time limit) at the next
  batch boundary, after which the previous handler (submitit's requeue) runs.
* `ResumableDataLoader` implements Lightning's `state_dict`/`load_state_dict` loader protocol:
  it stores the shuffling generator's state at the start of the epoch and the number of batches
  handed out, so a restart regenerates the same permutation and skips the consumed batches.
  (Without it, Lightning restarts a mid-epoch resume at the first batch of the epoch.)
* `resolve_ckpt_path` turns `ckpt_path` (null | auto | last | path) into a file and refuses a
  checkpoint written by a run with another model, before anything is built.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader

from safealign.errors import ConfigError
from safealign.io import write_json
from safealign.utils import rank_zero

log = logging.getLogger(__name__)
FINGERPRINT = "fingerprint.json"
_DROP = ("cache_dir",)  # where a cache lives does not change what the model is


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning can checkpoint and restore mid-epoch (exact batch order).

    No `__init__` override: Lightning re-creates loaders from their constructor arguments (e.g.
    to insert a DistributedSampler), so the state lives in lazily-set attributes.
    """

    _resume: dict | None = None
    _epoch_start: torch.Tensor | None = None
    _served = 0

    def __iter__(self):
        state, self._resume = self._resume, None
        if state and self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        self._epoch_start = self.generator.get_state() if self.generator is not None else None
        self._served = 0
        # super().__iter__ draws the worker base seed from the generator now and the sampler's
        # permutation at the first batch: both come after the state captured above.
        return self._serve(super().__iter__(), state["batches"] if state else 0)

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


class CheckpointOnSignal(L.Callback):
    """Save `dirpath/last.ckpt` at a consistent point when the job is told to stop.

    Args:
        dirpath: the checkpoint directory (the ModelCheckpoint's, so `ckpt_path=auto` finds it).
        signals: early-warning signals to honour at the next training-batch boundary; after the
            save, the handler that was installed before (submitit's requeue) is called.
            SIGTERM is always covered, through Lightning's graceful SIGTERM stop.
    """

    def __init__(self, dirpath: str, signals: list[str] | tuple[str, ...] = ("SIGUSR2",)) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.signals = [_signal(s) for s in signals]
        self._previous: dict[int, Any] = {}
        self._pending: tuple[int, Any] | None = None
        self._saved_step = -1

    def state_dict(self) -> dict[str, Any]:
        # The global torch RNG (dropout masks) goes into every checkpoint, so a resumed run with
        # dropout continues the same random stream: exact on one device; under DDP all ranks
        # restart from rank 0's state.
        state = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "torch_rng" in state_dict:
            torch.set_rng_state(state_dict["torch_rng"])
        if "cuda_rng" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda_rng"])

    def on_fit_start(self, trainer, pl_module) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._defer)

    def _defer(self, signum: int, frame) -> None:
        log.warning("received %s: checkpointing at the next batch boundary", signal.Signals(signum).name)
        self._pending = (signum, frame)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pending = self._pending is not None
        if trainer.world_size > 1:  # every rank must take part in the save
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if not pending:
            return
        self._save(trainer)
        signum, frame = self._pending or (self.signals[0], None)
        self._pending = None
        self._restore_handlers()
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)  # e.g. submitit: requeue this job, then exit
        elif previous != signal.SIG_IGN:
            os.kill(os.getpid(), signum)  # default action (terminate), now that the state is safe

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning raises SIGTERMException only after the current batch completed: consistent.
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.global_step != self._saved_step:
            self._save(trainer)
        # SIGTERMException is a bare SystemExit (status 0); exit like a SIGTERM-killed process
        # instead, so shells and schedulers see an interrupted run, not a finished one.
        exception.code = 128 + signal.SIGTERM

    def _save(self, trainer) -> None:
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step
        log.warning("saved %s at global step %d", self.path, trainer.global_step)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._previous = {}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handlers()


def _signal(name: str | int) -> int:
    if isinstance(name, int):
        return name
    sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if not isinstance(sig, signal.Signals):
        raise ConfigError("signals", f"unknown signal {name!r} (expected e.g. SIGUSR1, SIGUSR2)")
    return sig


def slurm_environment(auto_requeue: bool = True, requeue_signal: str = "SIGUSR1"):
    """Lightning's SLURMEnvironment from YAML (signal by name): on `requeue_signal` Lightning
    saves `hpc_ckpt_N.ckpt` in the run dir and runs `scontrol requeue` (resolved by `auto`)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=signal.Signals(_signal(requeue_signal)))


def run_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What makes a checkpoint's weights meaningful for this run: the model (architecture and
    tokenizer), the module class, and the data the built-in tokenizer is trained on (plus the
    init stage that produces the starting weights). Taken BEFORE the init stage swaps `model`."""
    keys = {"model": "model", "method": "method._target_", "data.source": "data.source",
            "init.method": "init.method._target_", "init.data.source": "init.data.source"}
    out = {}
    for name, key in keys.items():
        node = OmegaConf.select(cfg, key, default=None)
        if node is not None:
            out[name] = _plain(node)
    return out


def _plain(node: Any) -> Any:
    # key by key, so dropped keys (cache locations, often `${hydra:...}`) are never resolved
    if isinstance(node, DictConfig):
        return {k: "???" if OmegaConf.is_missing(node, k) else _plain(node[k])
                for k in node if k not in _DROP}
    if isinstance(node, ListConfig):
        return [_plain(v) for v in node]
    return node


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def checkpoint_dir(cfg: DictConfig) -> Path:
    """The ModelCheckpoint's directory (first callback with a `dirpath`), else output/checkpoints."""
    for cb in OmegaConf.select(cfg, "trainer.callbacks", default=None) or []:
        if OmegaConf.select(cb, "dirpath", default=None):
            return Path(cb.dirpath)
    return Path(cfg.paths.output_dir) / "checkpoints"


def newest_checkpoint(ckpt_dir: Path, run_dir: Path) -> Path | None:
    """Newest of `last*.ckpt` (ModelCheckpoint / CheckpointOnSignal) and Lightning's SLURM
    `hpc_ckpt_*.ckpt` (written in the run dir on the requeue signal)."""
    found = [*ckpt_dir.glob("last*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def check_checkpoint(path: Path, fingerprint: dict[str, Any]) -> None:
    """ConfigError unless `path` is a readable Lightning checkpoint of the same model."""
    if path.is_dir():  # DeepSpeed writes a directory of shards ("<name>.ckpt/checkpoint/...")
        if not (path / "checkpoint").is_dir():
            raise ConfigError("ckpt_path", f"{path} is a directory but not a DeepSpeed checkpoint")
    else:
        try:  # mmap: no need to read gigabytes of weights to look at the keys
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # any unreadable file gets the same clear message
            raise ConfigError("ckpt_path", f"{path} is not a readable checkpoint: {e}") from e
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "loops" not in ckpt:
            raise ConfigError("ckpt_path", f"{path} is not a Lightning training checkpoint")
    side = path.parent / FINGERPRINT
    if not side.exists():
        log.warning("%s has no %s beside it: cannot verify it belongs to this model", path, FINGERPRINT)
        return
    old = json.loads(side.read_text())
    if old != fingerprint:
        lines = _diff(old, fingerprint)[:8]
        raise ConfigError(
            "ckpt_path",
            f"{path} was written by a run with a different model; differences:\n  "
            + "\n  ".join(lines)
            + "\nResume needs the same model/method/data. To start fresh use ckpt_path=null "
            "(or another output dir); to warm-start from its weights use the exported model "
            "(model=hf model.name_or_path=<run dir>/model).",
        )


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint this run continues from, checked, or None for a fresh start.

    `ckpt_path`: null -> None; `auto` -> the newest checkpoint of this run dir, or None if there
    is none (the value for requeued/re-run sweep jobs); `last` -> the same but it must exist;
    anything else -> that file. Also records this run's fingerprint beside its checkpoints.
    Call at the start of `train()`, before the init stage replaces `cfg.model`.
    """
    value = cfg.get("ckpt_path")
    fingerprint = run_fingerprint(cfg)
    ckpt_dir, run_dir = checkpoint_dir(cfg), Path(cfg.paths.output_dir)
    path: Path | None = None
    if value in ("auto", "last"):
        path = newest_checkpoint(ckpt_dir, run_dir)
        if path is None and value == "last":
            raise ConfigError("ckpt_path", f"'last' but there is no checkpoint in {ckpt_dir}; "
                                           "use ckpt_path=auto to start fresh when there is none")
    elif value not in (None, "", "null"):
        path = Path(str(value)).expanduser()
        if not path.exists():
            raise ConfigError("ckpt_path", f"checkpoint {path} does not exist")
    if path is not None:
        check_checkpoint(path, fingerprint)
        log.info("resuming from %s", path)
    if rank_zero():
        write_json(ckpt_dir / FINGERPRINT, fingerprint)
    return str(path) if path is not None else None
