"""Entry-point helpers: a SafealignError is one clear line, not a traceback; the `run_stamp`
resolver that names run dirs (registered at import, i.e. before `@hydra.main` composes)."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable
from datetime import datetime
from typing import NoReturn

from omegaconf import DictConfig, OmegaConf

from safealign.errors import SafealignError


def user_error(exc: BaseException) -> SafealignError | None:
    """The SafealignError behind `exc`, if any (Hydra's instantiate wraps what targets raise)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SafealignError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run_stamp(job_id: str | None = None) -> str:
    """A run-dir name that concurrent launches never share (issue 14): local time to the
    millisecond, the scheduler's job id when there is one, and 4 random hex digits (two processes
    of one SLURM job, or two machines on one file system, can start in the same millisecond).
    Random from os.urandom, so seeded global RNGs in forked launchers cannot repeat it."""
    now = datetime.now()
    stamp = now.strftime("%Y-%m-%d_%H-%M-%S.") + f"{now.microsecond // 1000:03d}"
    return "_".join(p for p in (stamp, str(job_id or ""), secrets.token_hex(2)) if p)


# use_cache: one value per composed config, and Hydra copies the cache into every sweep job's
# config (load_sweep_config -> OmegaConf.copy_cache), so a job and its requeue share the sweep dir.
OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)


def report_error(err: BaseException) -> None:
    """A user error as one line on stderr (no traceback): what every entry point prints."""
    print(f"error: {err}", file=sys.stderr, flush=True)


def fail(err: BaseException) -> NoReturn:
    """Stop an entry point on a user error: one line on stderr, exit status 2."""
    report_error(err)
    raise SystemExit(2) from None


def run_task(fn: Callable[[DictConfig], object], cfg: DictConfig):
    try:
        return fn(cfg)
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        fail(err)
