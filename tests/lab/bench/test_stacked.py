"""iwae.lab.bench.stacked: single against stacked training steps, one row per (k, minibatch), and its table."""

from __future__ import annotations

import math

import pytest
import torch

from iwae.lab import bench
from iwae.lab.bench import stacked
from iwae.stacked import ModelStack

pytestmark = pytest.mark.usefixtures("one_thread")

HOURS_PER_MS_AT_20 = 2980 * 3280 / 3.6e6  # Burda's schedule: 2,980 minibatches of 20 a pass, 3,280 passes


@pytest.fixture(scope="module")
def images(mnist) -> torch.Tensor:
    return mnist.train.images[:100]


class Recorded:
    """What :func:`stacked.measure` builds and hands the timer: the models (the single one first), the stack, and
    the calls to time (with the timer answering made-up seconds)."""

    def __init__(self, monkeypatch, seconds: dict[str, float]) -> None:
        self.models: list[torch.nn.Module] = []
        self.stacks: list[ModelStack] = []
        self.timed: dict[str, bench.Timed] = {}
        self.seconds = seconds
        build_model = stacked.build_model

        def building(*args, **kwargs):
            self.models.append(build_model(*args, **kwargs))
            return self.models[-1]

        def stacking(models):
            self.stacks.append(ModelStack(models))
            return self.stacks[-1]

        def timing(calls, repeats, warmup, sync):
            self.timed.update(calls)
            return {name: self.seconds[name] for name in calls}

        monkeypatch.setattr(stacked, "build_model", building)  # where measure looks them up
        monkeypatch.setattr(stacked, "ModelStack", stacking)
        monkeypatch.setattr(stacked, "time_round_robin", timing)


def test_a_row_is_the_timers_seconds_as_times_speedup_throughput_and_burdas_hours(monkeypatch, images) -> None:
    recorded = Recorded(monkeypatch, {"single": 0.004, "stacked": 0.01})
    row = stacked.measure(images, models=3, k=2, batch=20, repeats=1, warmup=0)
    assert set(recorded.timed) == {"single", "stacked"}
    assert all(t.min_seconds == bench.TRAINING_MIN_SECONDS for t in recorded.timed.values())
    assert {key: row[key] for key in ("layers", "k", "batch", "models", "stacked_path")} == {
        "layers": 1, "k": 2, "batch": 20, "models": 3, "stacked_path": "eager",
    }  # fmt: skip
    assert row["single_path"].startswith(("fast: ", "autograd"))
    expected = {
        "single_ms": 4.0,
        "stacked_ms": 10.0,
        "stacked_ms_per_model": 10.0 / 3,
        "speedup": 3 * 0.004 / 0.01,  # 1.2: three single steps take 12 ms, one stacked step 10 ms
        "single_examples_per_second": 20 / 0.004,
        "stacked_examples_per_second": 3 * 20 / 0.01,
        "burda_schedule_hours_single": 4.0 * HOURS_PER_MS_AT_20,
        "burda_schedule_hours_stacked": 10.0 * HOURS_PER_MS_AT_20,
    }
    assert {key: row[key] for key in expected} == pytest.approx(expected, rel=1e-12)
    assert set(row) == {"layers", "k", "batch", "models", "single_path", "stacked_path", *expected}


def test_only_minibatch_20_rows_give_burdas_hours(monkeypatch, images) -> None:
    Recorded(monkeypatch, {"single": 0.004, "stacked": 0.01})
    row = stacked.measure(images, models=2, k=1, batch=7, repeats=1, warmup=0)
    assert row["burda_schedule_hours_single"] is None and row["burda_schedule_hours_stacked"] is None
    assert row["batch"] == 7 and row["single_examples_per_second"] == pytest.approx(7 / 0.004, rel=1e-12)


def test_the_stacked_models_start_as_separately_seeded_runs_and_both_steps_train(monkeypatch, images) -> None:
    recorded = Recorded(monkeypatch, {"single": 1.0, "stacked": 1.0})
    stacked.measure(images, models=3, k=2, batch=5, repeats=1, warmup=0, seed=4)
    single, *members = recorded.models
    (stack,) = recorded.stacks
    assert len(members) == stack.size == 3
    names = [name for name, _ in single.named_parameters()]
    start = {name: p.detach().clone() for name, p in stack.params.items()}
    for index, model in enumerate(members):  # seeds 4, 5, 6: the stack holds each model's initial parameters
        for name, p in model.named_parameters():
            assert torch.equal(start[f"model.{name}"][index], p)
    for name, p in single.named_parameters():  # the single run is the first stacked model's run (seed 4)
        assert torch.equal(start[f"model.{name}"][0], p)
    weights = [n for n in names if n.endswith("weight")]
    assert all(not torch.equal(start[f"model.{n}"][0], start[f"model.{n}"][1]) for n in weights)

    single_start = [p.detach().clone() for p in single.parameters()]
    recorded.timed["single"].fn()
    recorded.timed["single"].fn()
    assert all(not torch.equal(p, q) for p, q in zip(single.parameters(), single_start, strict=True))
    assert all(torch.isfinite(p).all() for p in single.parameters())

    recorded.timed["stacked"].fn()
    recorded.timed["stacked"].fn()
    for name, p in stack.params.items():  # every model of the stack moved, each from its own start
        assert p.shape[0] == 3 and torch.isfinite(p).all()
        for index in range(3):
            assert not torch.equal(p[index], start[name][index]), (name, index)


def test_with_compile_the_stacked_step_is_compiled_on_the_cpu(monkeypatch, images) -> None:
    Recorded(monkeypatch, {"single": 0.002, "stacked": 0.002})  # nothing is called: nothing compiles
    row = stacked.measure(images, models=2, k=1, batch=4, compile_model=True, repeats=1, warmup=0)
    assert row["stacked_path"] == "compile"


def test_a_measured_row_is_consistent_in_every_derived_number(images) -> None:
    row = stacked.measure(images, models=2, k=2, batch=20, repeats=1, warmup=0)
    for key in ("single_ms", "stacked_ms", "speedup", "single_examples_per_second", "stacked_examples_per_second"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["stacked_ms_per_model"] == pytest.approx(row["stacked_ms"] / 2, rel=1e-12)
    assert row["speedup"] == pytest.approx(2 * row["single_ms"] / row["stacked_ms"], rel=1e-12)
    assert row["single_examples_per_second"] == pytest.approx(20e3 / row["single_ms"], rel=1e-12)
    assert row["stacked_examples_per_second"] == pytest.approx(2 * 20e3 / row["stacked_ms"], rel=1e-12)
    assert row["burda_schedule_hours_single"] == pytest.approx(row["single_ms"] * HOURS_PER_MS_AT_20, rel=1e-12)
    assert row["burda_schedule_hours_stacked"] == pytest.approx(row["stacked_ms"] * HOURS_PER_MS_AT_20, rel=1e-12)
    assert row["stacked_path"] == "eager"


def test_the_table_has_one_line_per_row_under_its_header() -> None:
    row = {
        "layers": 2, "k": 50, "batch": 20, "models": 3, "single_ms": 4.0, "stacked_ms": 10.0,
        "stacked_ms_per_model": 10.0 / 3, "speedup": 1.2, "stacked_path": "graphs",
    }  # fmt: skip
    header = [
        "| layers | k | batch | models | single (ms) | stacked (ms) | per model (ms) | speedup | stacked path |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    assert stacked.markdown([]) == "\n".join(header) + "\n"
    line = "| 2 | 50 | 20 | 3 | 4.000 | 10.000 | 3.333 | 1.20x | graphs |"
    other = "| 1 | 5 | 100 | 2 | 0.125 | 0.200 | 0.100 | 1.25x | eager |"
    second = row | {"layers": 1, "k": 5, "batch": 100, "models": 2, "single_ms": 0.125, "stacked_ms": 0.2,
                    "stacked_ms_per_model": 0.1, "speedup": 1.25, "stacked_path": "eager"}  # fmt: skip
    assert stacked.markdown([row, second]) == "\n".join([*header, line, other]) + "\n"


def test_the_table_reads_the_rows_that_measure_returns(monkeypatch, images) -> None:
    Recorded(monkeypatch, {"single": 0.004, "stacked": 0.01})
    row = stacked.measure(images, models=3, k=2, batch=20, repeats=1, warmup=0)
    assert stacked.markdown([row]).splitlines()[2] == "| 1 | 2 | 20 | 3 | 4.000 | 10.000 | 3.333 | 1.20x | eager |"
