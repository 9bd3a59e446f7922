"""Keep Python's full garbage collections out of the token loop.

A full (generation 2) collection walks every tracked object in the process: with torch and
distributed imported that is ~330,000 objects and 100-150 ms on a 2-core machine, all of it
holding the GIL, so the expert calls of whichever layer it lands in wait as long (measured in
benchmarks/bench_stragglers.py, see docs/performance.md). During generation the automatic
collector is paused and only the young generations are collected between steps, which is
what the automatic collector would do minus the full pass; the full pass runs as usual once
no generation is in progress. Reference counting frees almost everything anyway: only cyclic
garbage that reaches the old generation during a generation waits for its end.

Process-wide and re-entrant: concurrent or nested generations share one pause, and the
collector is re-enabled (if it was enabled before) when the last one ends.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def full_collections_deferred() -> Iterator[None]:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()


def collect_young() -> None:
    """The young collections the paused collector would have run by now (never the full one)."""
    if not _depth:
        return
    g0, g1, _ = gc.get_count()
    t0, t1, _ = gc.get_threshold()
    if g1 >= t1:
        gc.collect(1)
    elif g0 >= t0:
        gc.collect(0)
