"""The benchmarks' shared timer, and their way of running each side of a comparison alone."""
from __future__ import annotations

import json
import subprocess
import sys
import time

SIDES = ("ours", "theirs")


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


def each_side_in_own_process(script: str) -> dict:
    """Run ``script`` with this process's arguments plus ``--side S`` for each side, one after the
    other, and return {side: the JSON object its last output line holds}. Each side runs alone:
    MindSpore's runtime threads outlive a run and slow torch down in a shared process (measured:
    torch's training step 2.34 s alone, 2.81 s after MindSpore had trained in that process)."""
    results = {}
    for side in SIDES:
        child = subprocess.run([sys.executable, script, *sys.argv[1:], "--side", side], check=True,
                               stdout=subprocess.PIPE, text=True)
        results[side] = json.loads(child.stdout.strip().splitlines()[-1])
    return results
