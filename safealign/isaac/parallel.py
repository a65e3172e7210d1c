"""Thread pool for ISAAC's blocked kernels: tasks in parallel, BLAS/torch single-threaded inside.

Both the neighbour search and DBSCAN split their work into independent tasks (row blocks,
locality groups). Running tasks on threads, each with one BLAS thread, keeps the numpy selection
passes between products parallel too, and keeps every sgemm call's rounding independent of how
many workers run (a threaded sgemm splits a call differently per thread count).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def default_workers(workers: int | None) -> int:
    """``workers`` if given, else min(8, CPUs this process may run on)."""
    if workers is not None:
        return max(1, int(workers))
    return max(1, min(8, len(os.sched_getaffinity(0))))


@contextlib.contextmanager
def single_threaded_kernels() -> Iterator[None]:
    """One BLAS/torch thread per worker while workers run in parallel (restored afterwards)."""
    from threadpoolctl import threadpool_limits

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(torch_threads)


def run_tasks(fn: Callable[[T], None], tasks: Sequence[T], workers: int | None) -> None:
    """Call ``fn(task)`` for every task on up to ``workers`` threads (see :func:`default_workers`),
    with single-threaded kernels even on one worker, so a call's rounding never depends on it."""
    workers = min(default_workers(workers), len(tasks))
    with single_threaded_kernels():
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(fn, tasks))
        else:
            for task in tasks:
                fn(task)
