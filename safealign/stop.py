"""Stop requests: the scheduler's "stop soon" signal, honoured at a safe point wherever it lands.

SLURM warns a job some time before killing it: submitit asks for `--signal=USR2@<signal_delay_s>`
(`SUBMITIT_PREEMPT_SIGNAL` renames it), `scripts/slurm/agent.sbatch` forwards USR2 the same way.
Acting inside the handler is unsafe (a checkpoint taken mid-step is inconsistent; under several
ranks one rank would save alone), and a handler that lives only during the training loop drops a
warning that lands in validation, the reference precompute, export or teardown: the job is then
killed at the time limit and never requeued. So there is one process-wide record instead:

* `install(signals)` (by `run.train` before any stage, and by `CheckpointOnSignal.setup`) swaps
  each signal's handler for one that only records the request, keeping the handler it replaced
  (submitit's requeue-and-exit, or the default action).
* `requested()`: is a request pending on this rank? Local and cheap.
* `honour(where)`: acts on it: marks the W&B run preempting (the sweep controller then re-runs the
  same run id: docs.wandb.ai "Signal handling and sweep runs"), restores the replaced handlers and
  runs the replaced one. submitit requeues the job and exits on rank 0; when the replaced
  disposition was the default action, or the handler returned, `StopRequested` is raised: a
  `SystemExit` with status 128 + signum, the shell's status for a signal-terminated process,
  after `finally` blocks and W&B's exit hook ran. A replaced SIG_IGN means "ignore": no-op.
* `check(where, collective=True)`: the hook for long loops that run outside Lightning's training
  loop (reference precompute, generation, export). Call it between batches.

Contract of `check` (also what `CheckpointOnSignal` relies on):
    Returns None when no stop is requested. Otherwise it does not return: it calls
    `honour(where)` (requeue-and-exit, or `StopRequested`), except when the replaced disposition
    was SIG_IGN. With `collective=True` and an initialised process group the decision is one
    all-reduce(MAX) of a 0/1 flag, so EVERY rank must call `check` at the same points (a
    sharded loop's batch boundaries), and all ranks stop together. Callers need no stop logic:
    `finally` blocks run as for any exit; do not catch `StopRequested` (being a `SystemExit`,
    `except Exception` does not).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, TypeVar

from safealign.errors import ConfigError

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
# On ranks > 0 submitit's handler returns without exiting ("it might kill the master task");
# waiting this long before exiting gives rank 0 time to `scontrol requeue` even where srun kills
# the whole step when one task exits (KillOnBadExit).
FOLLOWER_GRACE_S = 30.0

_previous: dict[int, Any] = {}  # signal -> the handler install() replaced
_replaced: dict[int, Any] = {}  # the same, kept after uninstall (see install)
_pending: tuple[int, FrameType | None] | None = None


class StopRequested(SystemExit):
    """The process stops because a stop signal was honoured; exit status 128 + signum."""

    def __init__(self, signum: int, where: str = "") -> None:
        super().__init__(128 + signum)
        self.signum, self.where = signum, where


def signal_number(name: str | int) -> int:
    """`"SIGUSR2"`, `"USR2"` or `12` -> 12; ConfigError naming an unknown signal."""
    if isinstance(name, int):
        return name
    sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if not isinstance(sig, signal.Signals):
        raise ConfigError("signals", f"unknown signal {name!r} (expected e.g. SIGUSR1, SIGUSR2)")
    return int(sig)


def default_signals() -> tuple[str, ...]:
    """submitit's warning signal (its own default and env override): what SLURM will send."""
    return ("SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"),)


def install(signals: Iterable[str | int] | None = None) -> list[int]:
    """Record (instead of act on) `signals` from now on; returns the ones newly installed, which
    the caller owns and passes to `uninstall`. Idempotent; a no-op outside the main thread
    (Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return []
    new = []
    for sig in map(signal_number, default_signals() if signals is None else signals):
        if sig in _previous:
            continue
        current = signal.getsignal(sig)
        if current is _record:  # put back behind our back (Lightning's signal-connector teardown)
            current = _replaced.get(sig, signal.SIG_DFL)
        _previous[sig] = _replaced[sig] = current
        signal.signal(sig, _record)
        new.append(sig)
    return new


def uninstall(signals: Iterable[int] | None = None) -> None:
    """Put back the handlers `install` replaced (all of them when `signals` is None)."""
    for sig in list(_previous if signals is None else signals):
        previous = _previous.pop(sig, None)
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(sig, previous)


def _record(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _pending is None:  # the first one decides; repeats (srun + agent forwarding) are noise
        _pending = (signum, frame)
        log.warning("received %s: stopping at the next safe point", signal.Signals(signum).name)


def requested() -> bool:
    return _pending is not None


def clear() -> None:
    """Forget a pending request (tests; a caller that has handled the stop itself)."""
    global _pending
    _pending = None


def check(where: str, collective: bool = True) -> None:
    """Honour a pending stop request (see the module docstring for the contract)."""
    pending = requested()
    if collective:
        pending = _any_rank(pending)
    if pending:
        honour(where)


def honour(where: str = "") -> None:
    """Act on the request now: W&B preempting, replaced handler, else `StopRequested`."""
    global _pending
    signum, frame = _pending or (next(iter(_previous), signal_number(default_signals()[0])), None)
    _pending = None
    log.warning("honouring %s (%s)", signal.Signals(signum).name, where or "stop request")
    previous = _previous.get(signum, signal.SIG_DFL)
    uninstall()
    if previous == signal.SIG_IGN:
        return
    mark_wandb_preempting()
    if callable(previous):
        previous(signum, frame)  # submitit, rank 0: pickle the job, scontrol requeue, sys.exit
        if _global_rank() != 0:
            time.sleep(FOLLOWER_GRACE_S)
    else:  # default action: exit cleanly instead, and let a repeated signal not cut that short
        _ignore(signum)
    raise StopRequested(signum, where)


def mark_wandb_preempting() -> bool:
    """`wandb.run.mark_preempting()` if a W&B run is open (never imports wandb itself)."""
    run = getattr(sys.modules.get("wandb"), "run", None)
    if run is None:
        return False
    try:
        run.mark_preempting()
    except Exception as e:  # W&B trouble must never block the requeue
        log.warning("could not mark the W&B run preempting: %s", e)
        return False
    log.warning("marked W&B run %s preempting: the sweep re-runs it", getattr(run, "id", "?"))
    return True


def honoured(fn: F) -> F:
    """Wrap a task function (`run.train`): install before any stage runs, honour a request still
    pending when it returns (one that arrived during export or the summary), restore after."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        mine = install()
        try:
            result = fn(*args, **kwargs)
            check(f"end of {fn.__name__}", collective=False)  # ranks may end apart: no collective
            return result
        finally:
            uninstall(mine)

    return wrapper  # type: ignore[return-value]


def _ignore(signum: int) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signum, signal.SIG_IGN)


def _global_rank() -> int:
    from safealign.ranks import global_rank

    return global_rank()


def _any_rank(flag: bool) -> bool:
    dist = sys.modules.get("torch.distributed")  # never import torch just to ask
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return flag
    if dist.get_world_size() < 2:
        return flag
    import torch

    on_gpu = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
