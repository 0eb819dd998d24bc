"""iwae.lab.bench.timing: a repeat is a run of back-to-back calls lasting at least its minimum time."""

from __future__ import annotations

import time

from iwae.lab import bench


def test_a_repeat_runs_calls_back_to_back_for_the_minimum_time() -> None:
    """A training step's repeat is a run of consecutive steps (as a training loop takes them), not one step."""
    counts = {"step": 0, "matmul": 0}

    def call(name: str, seconds: float):
        def fn() -> None:
            counts[name] += 1
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                pass

        return fn

    calls = {
        "step": bench.Timed(call("step", 0.001), min_seconds=0.05),
        "matmul": bench.Timed(call("matmul", 0.001)),
    }
    seconds = bench.time_round_robin(calls, repeats=3, warmup=1, sync=lambda: None)
    assert counts["matmul"] == 1 + 1 + 3  # warm-up, the probe for calls per repeat, one call a repeat
    assert counts["step"] >= 1 + 1 + 3 * 2  # 0.05 s of 1 ms calls: 50 a repeat, at least 2 on a crowded machine
    assert all(0.001 <= value < 0.05 for value in seconds.values())  # seconds per call, not per repeat
