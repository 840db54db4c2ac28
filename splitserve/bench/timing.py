"""Wall-clock timing of a callable, for the micro-benchmarks under bench/ (the callable does
its own device synchronization, e.g. by reading a result back)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object], iters: int, warmup: int = 3) -> list[float]:
    """Seconds per call of ``iters`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    return statistics.median(timed(fn, iters, warmup)) * 1e3
