"""Shared helpers of the benchmarks: median timings and the result rows ``run.py`` collects.

Every benchmark times nlrw's path and its baseline in the same process, interleaved, and
reports medians: this machine is shared and noisy, so single times mean little.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def result(
    name: str,
    ours_median_s: float,
    baseline: str,
    baseline_median_s: float,
    target: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One row of ``benches/results.json``; ``ratio`` = baseline / ours (higher is better)."""
    row: dict[str, Any] = {
        "name": name,
        "ours_median_s": ours_median_s,
        "baseline": baseline,
        "baseline_median_s": baseline_median_s,
        "ratio": baseline_median_s / ours_median_s,
    }
    if target is not None:
        row["target"] = target
    row.update(extra)
    return row
