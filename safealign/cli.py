"""Error presentation for the entry points: a SafealignError is one clear line, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from omegaconf import DictConfig

from safealign.errors import SafealignError


def run_task(fn: Callable[[DictConfig], object], cfg: DictConfig):
    try:
        return fn(cfg)
    except SafealignError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
