"""Tasks and runners (iwae.lab.runner): a task writes its result files and never the database (which the sweep, or
``iwae results --rescan``, indexes); a task never raises, but ends busy or with its error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lock_holders import held_by_another_thread
from tiny_runs import TINY as LAB_TINY

from iwae.cli import main
from iwae.lab import runner
from iwae.lab.run import RESULT_FILE
from iwae.lab.runner import LocalRunner, Task, TaskEnd, available_cores, run_task
from iwae.lab.store import DB_FILE, ResultStore
from iwae.lab.sweep import resolved_specs
from iwae.runs import LOCK_FILE as RUN_LOCK

TINY = {**LAB_TINY, "epochs": 1, "k": 2}  # the lab's tiny run, one pass


def test_a_task_writes_its_result_file_and_never_the_database_which_rescan_indexes(tmp_path: Path, capsys) -> None:
    (spec,) = resolved_specs({"fixed": TINY, "axes": {"objective": ["iwae"]}}, tmp_path)
    task = Task((spec.to_dict(),), str(tmp_path), attempt="a1", device="cpu")
    assert run_task(task).busy is None and run_task(task).error is None
    assert not (tmp_path / DB_FILE).exists()
    written = json.loads((tmp_path / "runs" / "iwae" / RESULT_FILE).read_text())
    assert (written["status"], written["attempt"], written["epochs_done"]) == ("finished", "a1", 1)

    assert main(["results", str(tmp_path), "--rescan"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["indexed"] == 1 and [(r["name"], r["status"]) for r in listed["runs"]] == [("iwae", "finished")]
    row = ResultStore.in_dir(tmp_path).get("iwae")
    assert row["eval"] == written["eval"] and row["metrics"] == written["metrics"]


def test_a_task_ends_busy_or_with_its_error_and_never_raises(tmp_path: Path, monkeypatch) -> None:
    (spec,) = resolved_specs({"fixed": TINY}, tmp_path)
    task = Task((spec.to_dict(),), str(tmp_path), attempt="a1", device="cpu")
    run_dir = tmp_path / "runs" / spec.name
    run_dir.mkdir(parents=True)
    with held_by_another_thread(run_dir / RUN_LOCK):
        end = run_task(task)
    assert end.error is None and "in use by" in end.busy and list(run_dir.iterdir()) == [run_dir / RUN_LOCK]

    def crash(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(runner, "run_group", crash)
    assert run_task(task) == TaskEnd(error="RuntimeError: a bug")


def test_a_local_runner_needs_a_worker_and_shares_the_cores_among_them() -> None:
    with pytest.raises(ValueError, match="--workers must be >= 1"):
        LocalRunner(0)
    assert LocalRunner(1).threads == available_cores() and LocalRunner(10_000).threads == 1
