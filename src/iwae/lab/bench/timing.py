"""The timing harness: medians over interleaved (round-robin) repeats, each repeat looped to a minimum duration."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for queued device work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass(frozen=True)
class Timed:
    """A call to time; a repeat loops it until it takes at least ``min_seconds``.

    The loop keeps microsecond calls above the timer's noise.
    """

    fn: Callable[[], Any]
    min_seconds: float = 0.0


def _calls_per_repeat(timed: Timed, sync: Callable[[], None]) -> int:
    sync()
    started = time.perf_counter()
    timed.fn()
    sync()
    once = time.perf_counter() - started
    return max(1, min(10_000, math.ceil(timed.min_seconds / max(once, 1e-9))))


def time_round_robin(calls: dict[str, Timed], repeats: int, warmup: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds per call of each of ``calls`` over ``repeats`` after ``warmup`` calls.

    The repeats are interleaved (one repeat of every call, then the next), so a change in the machine's
    load during the measurement affects every call alike.
    """
    inner = {}
    for name, timed in calls.items():
        for _ in range(warmup):
            timed.fn()
        inner[name] = _calls_per_repeat(timed, sync)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, timed in calls.items():
            sync()
            started = time.perf_counter()
            for _ in range(inner[name]):
                timed.fn()
            sync()
            times[name].append((time.perf_counter() - started) / inner[name])
    return {name: statistics.median(values) for name, values in times.items()}
