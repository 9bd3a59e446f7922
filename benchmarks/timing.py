"""What every benchmark here times with: the median of repeated wall-clock runs, in ms.

Scripts in benchmarks/ run as `python benchmarks/NAME.py`, so this folder is on their path.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> float:
    """Median milliseconds of `repeats` calls of fn, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
