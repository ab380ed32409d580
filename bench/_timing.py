"""The benchmarks' shared timer."""
from __future__ import annotations

import time


def best_time(fn, repeats: int, warmup: int = 1) -> float:
    """Best wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones (the best,
    not the mean: on a shared machine the fastest run is the one least disturbed)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
