"""iwae.lab.bench.cells: the training steps a cell times, in runs of consecutive steps, and the compiled step."""

from __future__ import annotations

import pytest
import torch

from iwae.config import TrainConfig
from iwae.lab import bench
from iwae.lab.bench import cells
from iwae.models import ModelConfig


def test_the_training_steps_are_timed_in_runs_of_consecutive_steps(monkeypatch) -> None:
    timed: dict[str, bench.Timed] = {}

    def capture(calls, repeats, warmup, sync):
        timed.update(calls)
        return {name: 1e-3 for name in calls}

    monkeypatch.setattr(cells, "time_round_robin", capture)  # where measure_cell looks it up
    settings = bench.BenchSettings(mode="test", layers=(1,), ks=(2,), batches=(3,), pyro=False, progress=False)
    bench.measure_cell(1, 2, 3, torch.full((4, 784), 0.3), settings, bench.PYRO_SKIPPED)
    assert timed["iwae"].min_seconds == timed["plain"].min_seconds == bench.TRAINING_MIN_SECONDS > 0
    matmuls = [value for name, value in timed.items() if name not in ("iwae", "plain")]
    assert matmuls and all(value.min_seconds == bench.MIN_TIMED_SECONDS for value in matmuls)


@pytest.mark.slow
def test_compiled_iwae_step_trains() -> None:
    """``iwae bench --compile`` times the step of ``iwae train --compile``: it runs and moves the parameters."""
    config = TrainConfig(objective="iwae", k=3, batch_size=4, model=ModelConfig.burda(1))
    model = bench.build_model(config, torch.full((2, 784), 0.3), torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    step = bench.iwae_step(model, config, compile_model=True)
    step(torch.bernoulli(torch.full((4, 784), 0.3), generator=torch.Generator().manual_seed(0)))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
