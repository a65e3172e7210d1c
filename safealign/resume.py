"""Resume: which checkpoint a run continues from, and a checkpoint at a batch boundary when the
job is told to stop.

Re-running the same command (same output dir) with `ckpt_path=auto` continues from the newest
checkpoint, and the final weights equal those of an uninterrupted run (tests/test_resume.py):

* `CheckpointOnSignal` saves `last.ckpt` when the run is stopped: on SIGTERM via Lightning's own
  graceful stop (it finishes the batch, then raises `SIGTERMException`), and on the scheduler's
  early-warning signal (submitit: SIGUSR2, `signal_delay_s` before the time limit) at the next
  safe point wherever it lands (`safealign.stop`), after which submitit's requeue runs.
* The train loader restarts mid-epoch with the exact batch order
  (`safealign.data.loader.ResumableDataLoader`).
* `resolve_ckpt_path` turns `ckpt_path` (null | auto | last | path) into a file and refuses a
  checkpoint written with another weight-relevant config (`run_fingerprint`: model, method and
  its β/γ/lr..., data, seed; not paths, logging or the run's length), before anything is built.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from safealign import stop
from safealign.errors import ConfigError
from safealign.fingerprint import FINGERPRINT, check_fingerprint, run_fingerprint
from safealign.io import write_json
from safealign.utils import rank_zero

log = logging.getLogger(__name__)


class CheckpointOnSignal(L.Callback):
    """Save `dirpath/last.ckpt` at a consistent point when the job is told to stop, then let the
    stop go ahead (`safealign.stop.honour`: W&B preempting, submitit's requeue, or exit 128+sig).

    Where the request lands decides where it is acted on (the decision is collective under
    several ranks, `reduce_boolean_decision`): the next training-batch boundary; the end of
    validation (nothing to save during the sanity check); the end of training (the final state);
    before fit, e.g. in the reference precompute, at that loop's own `stop.check` or the first
    training batch. After fit (export, summary) `run.train` honours it when it returns.
    SIGTERM stays Lightning's graceful stop: the batch finishes, then `on_exception` saves.

    Args:
        dirpath: the checkpoint directory (the ModelCheckpoint's, so `ckpt_path=auto` finds it).
        signals: the warning signals to record; default submitit's (SIGUSR2).
    """

    def __init__(self, dirpath: str, signals: list[str] | tuple[str, ...] | None = None) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.signals = [stop.signal_number(s) for s in signals or stop.default_signals()]
        self._installed: list[int] = []
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

    def setup(self, trainer, pl_module, stage: str) -> None:
        # before the module's setup/on_fit_start (reference precompute): nothing is left uncovered
        self._installed = stop.install(self.signals)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stop_requested(trainer):
            self._save(trainer)
            stop.honour("training batch boundary")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._stop_requested(trainer):
            return
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save(trainer)  # where ModelCheckpoint saves too: the loops resume from here
        stop.honour("end of validation")

    def on_train_end(self, trainer, pl_module) -> None:
        if self._stop_requested(trainer):
            if trainer.global_step != self._saved_step:
                self._save(trainer)  # the final state: a requeued run only redoes the export
            stop.honour("end of training")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        stop.uninstall(self._installed)  # Lightning skips the teardown hooks after an exception
        self._installed = []
        # Lightning raises SIGTERMException only after the current batch completed: consistent.
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.global_step != self._saved_step:
            self._save(trainer)
        stop.mark_wandb_preempting()  # a non-zero exit + preempting: the W&B sweep re-runs it
        # SIGTERMException is a bare SystemExit (status 0); exit like a SIGTERM-killed process
        # instead, so shells and schedulers see an interrupted run, not a finished one.
        exception.code = 128 + signal.SIGTERM

    def teardown(self, trainer, pl_module, stage: str) -> None:
        mine, self._installed = self._installed, []
        if mine and stop.requested():  # the handlers are ours: nobody after us would honour it
            stop.honour(f"teardown ({stage})")
        stop.uninstall(mine)

    def _stop_requested(self, trainer) -> bool:
        pending = stop.requested()
        if trainer.world_size > 1:  # every rank must take part in the save, and stop together
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        return pending

    def _save(self, trainer) -> None:
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step
        log.warning("saved %s at global step %d", self.path, trainer.global_step)


def slurm_environment(auto_requeue: bool = True, requeue_signal: str = "SIGUSR1"):
    """Lightning's SLURMEnvironment from YAML (signal by name): on `requeue_signal` Lightning
    saves `hpc_ckpt_N.ckpt` in the run dir and runs `scontrol requeue` (resolved by `auto`)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    sig = signal.Signals(stop.signal_number(requeue_signal))
    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=sig)


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
    """ConfigError unless `path` is a readable Lightning checkpoint (a file, or a DeepSpeed or
    torch.distributed directory) written by a run with this weight-relevant config."""
    _check_readable(path)
    check_fingerprint(path, fingerprint)


def _check_readable(path: Path) -> None:
    if path.is_dir():  # sharded checkpoints are directories named <name>.ckpt
        if (path / "checkpoint").is_dir():  # DeepSpeed: <name>.ckpt/checkpoint/*
            return
        if (path / ".metadata").is_file():  # torch.distributed.checkpoint (FSDP2/ModelParallel)
            return
        raise ConfigError(
            "ckpt_path",
            f"{path} is a directory but neither a DeepSpeed nor a "
            "torch.distributed (.metadata) checkpoint",
        )
    try:  # mmap: no need to read gigabytes of weights to look at the keys
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # any unreadable file gets the same clear message
        raise ConfigError("ckpt_path", f"{path} is not a readable checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "loops" not in ckpt:
        raise ConfigError("ckpt_path", f"{path} is not a Lightning training checkpoint")


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
            raise ConfigError(
                "ckpt_path",
                f"'last' but there is no checkpoint in {ckpt_dir}; "
                "use ckpt_path=auto to start fresh when there is none",
            )
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
