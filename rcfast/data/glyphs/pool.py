"""An order-keeping parallel map over worker processes, private to the glyph data set.

The pool takes its own `forkserver` context (`spawn` where there is none), so
no worker is forked from a process that may hold threads (torch's) and the
caller's default multiprocessing start method is not chosen for it. Starting
such workers makes CPython (`multiprocessing.spawn.get_preparation_data`)
fix an unset default start method as a side effect; the pool puts it back
unset afterwards. As with any such pool, scripts must keep their top-level
code under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator


def _context():
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def map_in_processes(fn: Callable, items: list, num_workers: int, progress=None) -> Iterator:
    """`map(fn, items)` in order, in `num_workers` processes (in this one when <= 1).

    `progress`, when given, is called with each result as it arrives (for a
    progress bar).
    """
    if num_workers <= 1 or len(items) <= 1:
        results = map(fn, items)
    else:
        results = _pooled(fn, items, min(num_workers, len(items)))
    for result in results:
        if progress is not None:
            progress(result)
        yield result


def _pooled(fn: Callable, items: list, num_workers: int) -> Iterator:
    default_was_unset = multiprocessing.get_start_method(allow_none=True) is None
    try:
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=_context()) as pool:
            yield from pool.map(fn, items)
    finally:
        if default_was_unset:
            multiprocessing.set_start_method(None, force=True)


def default_workers(num_workers: int | None) -> int:
    """`num_workers`, checked, or one per core available to this process."""
    if num_workers is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer or None, got {num_workers!r}")
    return num_workers
