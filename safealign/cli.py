"""Error presentation for the entry points: a SafealignError is one clear line, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from omegaconf import DictConfig

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


def run_task(fn: Callable[[DictConfig], object], cfg: DictConfig):
    try:
        return fn(cfg)
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
