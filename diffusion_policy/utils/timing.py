"""Wall-clock timing of callables, for the benchmark scripts and start-up choices."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, float]:
    """``{"min": ..., "median": ...}`` of a list of timings."""
    return {"min": min(times), "median": statistics.median(times)}


def alternating(
    fns: Mapping[Hashable, Callable[[], Any]],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[Hashable, list[float]]:
    """Seconds of each function per round, the functions taking turns (after an untimed warm-up
    round), so a burst of load on the machine hits them all.

    Args:
        fns: The functions to time, by name.
        repeats: Timed rounds.
        clock: Seconds now (a parameter for tests).
    """
    times: dict[Hashable, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = clock()
            fn()
            if round_:
                times[name].append(clock() - start)
    return times
