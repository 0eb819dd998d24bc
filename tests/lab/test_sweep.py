"""Sweeps (iwae.lab.sweep): changed training settings refused, finished runs of another grid reused, a continued
run of a reused base run once, a sweep run again with nothing to do, and stacked sweeps (seeds and objectives in
one stack; by default on a GPU only)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_runs import TINY

from iwae import runs
from iwae.lab import sweep
from iwae.lab.grid import RUNS_SUBDIR
from iwae.lab.store import ResultStore
from iwae.lab.sweep import run_sweep, stacks_by_default


def test_sweep_refuses_changed_training_settings_but_not_changed_evaluation(tmp_path: Path) -> None:
    grid = {"fixed": {**TINY, "objective": "iwae", "epochs": 2}, "axes": {"k": [1, 2]}}
    store = ResultStore.in_dir(tmp_path)
    recorded = sweep.resolved_specs(grid, tmp_path)[1]
    store.upsert(recorded.name, config=recorded.options, status="running")
    changed = {"fixed": grid["fixed"] | {"epochs": 3}, "axes": {"k": [1, 2]}}
    with pytest.raises(ValueError, match="other training settings"):
        sweep.run_sweep(changed, tmp_path, progress=False)  # refused before anything runs
    assert store.get("k1") is None and not (tmp_path / sweep.GRID_COPY).exists()
    sweep._check_same_settings(store.get("k2"), recorded.options | {"eval_k": 99}, tmp_path)  # allowed


def test_a_finished_run_of_another_grid_is_reused_not_retrained(tmp_path: Path) -> None:
    from iwae.lab.reports import load_records

    first = {"fixed": {**TINY, "objective": "iwae", "epochs": 1}, "axes": {"k": [2]}}
    (spec,) = sweep.resolved_specs(first, tmp_path)
    assert sweep.execute([spec.to_dict()], tmp_path, device="cpu")[0][1] == "finished"
    second = {"fixed": {**TINY, "epochs": 1}, "axes": {"objective": ["iwae"], "k": [2]}}  # same settings
    summary = sweep.run_sweep(second, tmp_path, progress=False, device="cpu")
    assert (summary["ran"], summary["reused"]) == (0, 1)
    store = ResultStore.in_dir(tmp_path)
    original, twin = store.get("k2"), store.get("iwae-k2")
    assert twin["status"] == "finished" and twin["eval"] == original["eval"] and twin["run_dir"] == original["run_dir"]
    assert (tmp_path / RUNS_SUBDIR / "iwae-k2" / runs.MODEL_FILE).is_file()  # init_from finds it
    records, _ = load_records([tmp_path])
    assert len(records) == 1  # one run, however many grids name it


def test_a_continued_run_of_a_reused_base_runs_once_and_the_sweep_can_be_repeated(tmp_path: Path) -> None:
    first = {"fixed": {**TINY, "objective": "iwae", "epochs": 1}, "axes": {"k": [2]}}
    (spec,) = sweep.resolved_specs(first, tmp_path)
    sweep.execute([spec.to_dict()], tmp_path, device="cpu")
    phases = {
        "fixed": TINY,
        "phase": [
            {"name": "base", "fixed": {"epochs": 1}, "axes": {"setting": [{"objective": "iwae", "k": 2}]}},
            {
                "name": "swap",
                "fixed": {"epochs": 1},
                "axes": {"setting": [{"objective": "vae", "k": 2, "init_from": "base-iwae-k2"}]},
            },
        ],
    }
    summary = sweep.run_sweep(phases, tmp_path, progress=False, device="cpu")
    assert (summary["ran"], summary["reused"], summary["failed"]) == (1, 1, {})
    again = sweep.run_sweep(phases, tmp_path, progress=False, device="cpu")  # nothing to do, no complaint
    assert (again["ran"], again["skipped"]) == (0, 2)
    from iwae.lab.reports import load_records, table2

    rows = table2(load_records([tmp_path])[0]).rows
    assert [row[1:3] for row in rows] == [["iwae k=2", "vae k=2"]]  # the continued run finds its (reused) base


def test_a_sweep_stacks_seeds_and_objectives_and_records_each_run(tmp_path: Path) -> None:
    grid = {
        "fixed": {
            "dataset": "mnist",
            "layers": 1,
            "k": 2,
            "epochs": 2,
            "train_limit": 100,
            "valid_k": 2,
            "eval_k": 4,
            "eval_limit": 10,
            "samples": False,
        },
        "axes": {"objective": ["vae", "iwae"], "seed": [0, 1]},
    }
    summary = run_sweep(grid, tmp_path / "sweep", device="cpu", progress=False, stack=True)
    assert summary["failed"] == {} and summary["ran"] == 4 and summary["stack"] is True
    rows = ResultStore.in_dir(tmp_path / "sweep").rows()
    assert {r["status"] for r in rows} == {"finished"} and len(rows) == 4
    for r in rows:
        metrics = runs.read_metrics(Path(r["run_dir"]))
        assert [m["stacked"] for m in metrics] == [4, 4]  # one stack of all four
        assert r["eval"]["nll"] is not None
    again = run_sweep(grid, tmp_path / "sweep", device="cpu", progress=False, stack=True)
    assert again["skipped"] == 4 and again["ran"] == 0


def test_sweeps_stack_by_default_on_a_gpu_only() -> None:
    """On a CPU a stacked step costs what the fast path's single steps cost (docs/performance.md): no gain."""
    assert stacks_by_default("cpu") is False
