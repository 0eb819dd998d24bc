"""iwae.lab.schedules: the schedules study's preset (five schedules at one budget) and its comparison, which pools
seeds against the minibatch-20 cell."""

from __future__ import annotations

import pytest

from iwae.lab import schedules
from iwae.lab.grid import expand_grid, load_grid, train_config
from iwae.lab.sweep import stack_groups


def test_the_study_preset_compares_five_schedules_at_one_budget() -> None:
    specs = expand_grid(load_grid("schedules-quick"))
    configs = [train_config(s.options) for s in specs]
    assert {c.total_epochs for c in configs} == {40}  # burda:4
    assert {schedules.schedule_label(c) for c in configs} == {
        "batch 20 (Burda)", "batch grows 20→28→38→54, lr 0.001", "batch 100, lr from 0.00224",
        "batch 500, lr from 0.005", "k 1→2→3→5, batch 20",
    }  # fmt: skip
    assert {c.seed for c in configs} == {0, 1}
    groups = stack_groups([s for s in specs if s.phase == "batch"])
    assert len(groups) == 8 and all(len(group) == 2 for group in groups)  # the seeds of each cell stack


def test_comparison_pools_seeds_against_the_minibatch_20_cell() -> None:
    def row(seed: int, nll: float, seconds: float, **options) -> dict:
        base = {"objective": "iwae", "k": 5, "schedule": "burda:2", "seed": seed}
        return {"status": "finished", "config": base | options, "eval": {"nll": nll}, "seconds": seconds}

    rows = [
        row(0, 90.0, 100.0), row(1, 90.4, 100.0),
        row(0, 90.1, 60.0, batch_schedule="grow"), row(1, 90.5, 60.0, batch_schedule="grow"),
        row(0, 95.0, 20.0, batch_size=500, lr_scale="sqrt"),
    ]  # fmt: skip
    table = {r["schedule"]: r for r in schedules.comparison(rows)}
    base = table["batch 20 (Burda)"]
    assert base["nll"] == pytest.approx(90.2) and base["seeds"] == 2 and base["nll_minus_batch20"] == 0
    grow = table["batch grows 20→28, lr 0.001"]
    assert grow["nll_minus_batch20"] == pytest.approx(0.1) and grow["matches_batch20"]
    assert grow["time_saved"] == pytest.approx(0.4)
    big = table["batch 500, lr from 0.005"]
    assert not big["matches_batch20"] and big["nll_sd"] is None
    text = schedules.markdown(schedules.comparison(rows))
    assert "| iwae | 5 | batch grows 20→28, lr 0.001 | 2 | 90.30 ± 0.28 |" in text and "| +0.10 | yes | 40% |" in text
