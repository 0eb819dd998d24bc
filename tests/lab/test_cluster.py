"""Sweeps through submitit (iwae.lab.cluster): tasks write result files and never the database (a task alone:
tests/lab/test_runner.py); the sweep indexes them; phases run in order; a Slurm task that leaves the queue without a
result is failed, through squeue alone; a sweep that stops cancels its tasks. On a real cluster, with Slurm's
refusals: tests/integration/test_slurm.py."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_runs import TINY as LAB_TINY

from iwae import runs
from iwae.cli import main
from iwae.lab import cluster, runner
from iwae.lab.cluster import ClusterOptions, SubmititRunner, minutes
from iwae.lab.run import RESULT_FILE
from iwae.lab.runner import Task, TaskEnd
from iwae.lab.store import ResultStore
from iwae.lab.sweep import resolved_specs, run_sweep

pytest.importorskip("submitit")

TINY = {**LAB_TINY, "epochs": 1, "k": 2}  # the lab's tiny run, one pass
PHASES = {
    "fixed": TINY,
    "phase": [
        {"name": "base", "axes": {"objective": ["vae", "iwae"]}},
        {"name": "cont", "axes": {"setting": [{"objective": "iwae", "init_from": "base-vae"}]}},
    ],
}


def test_a_sweep_through_submitit_runs_its_phases_in_order_and_indexes_the_result_files(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    summary = run_sweep(
        PHASES, out, runner=SubmititRunner(ClusterOptions(engine="debug")), device="cpu", progress=False
    )
    assert (summary["ran"], summary["failed"], summary["diverged"], summary["busy"]) == (3, {}, {}, {})
    rows = {row["name"]: row for row in ResultStore.in_dir(out).rows()}
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(
        ["base-vae", "base-iwae", "cont-iwae-from-base-vae"], "finished"
    )
    for name, row in rows.items():
        written = json.loads((out / "runs" / name / RESULT_FILE).read_text())
        assert written["status"] == "finished" and written["eval"] == row["eval"]
    continued = runs.load_config(out / "runs" / "cont-iwae-from-base-vae")  # the later phase found the earlier's run
    assert continued.init_from == str((out / "runs" / "base-vae").resolve())
    assert (out / "submitit").is_dir()
    again = run_sweep(PHASES, out, runner=SubmititRunner(ClusterOptions(engine="debug")), device="cpu", progress=False)
    assert (again["ran"], again["skipped"]) == (0, 3)


@pytest.mark.slow
def test_submitits_local_executor_runs_each_task_in_its_own_process(tmp_path: Path) -> None:
    grid = {"fixed": TINY, "axes": {"objective": ["vae", "iwae"]}}
    runner = SubmititRunner(ClusterOptions(engine="local", time_limit_min=10))
    summary = run_sweep(grid, tmp_path, runner=runner, device="cpu", progress=False, stack=False)
    assert (summary["ran"], summary["failed"]) == (2, {})
    assert {row["status"] for row in ResultStore.in_dir(tmp_path).rows()} == {"finished"}
    logs = sorted(path.name for path in (tmp_path / "submitit").glob("*_log.out"))
    assert len(logs) == 2 and all(not name.startswith(str(os.getpid())) for name in logs)  # two jobs, not us


class _LostJob:
    job_id = "42_0"

    def result(self):
        raise RuntimeError("Job (task=0) failed during processing with trace:\n...")

    def cancel(self, check: bool = True) -> None:
        pass


class _LostArray:
    def map_array(self, fn, tasks):
        return [_LostJob() for _ in tasks]


def test_a_task_that_raises_or_a_job_that_fails_fails_its_runs(tmp_path: Path, monkeypatch) -> None:
    (spec,) = resolved_specs({"fixed": TINY}, tmp_path)
    debug = SubmititRunner(ClusterOptions(engine="debug"))

    def crash(*args, **kwargs):
        raise RuntimeError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr(runner, "run_group", crash)
        summary = run_sweep({"fixed": TINY}, tmp_path, runner=debug, device="cpu", progress=False)
    assert summary["failed"] == {spec.name: "RuntimeError: a bug"}
    monkeypatch.setattr(SubmititRunner, "executor", lambda self, folder: _LostArray())
    summary = run_sweep({"fixed": TINY}, tmp_path, runner=debug, device="cpu", progress=False)
    assert summary["failed"] == {
        spec.name: "cluster job 42_0: RuntimeError: Job (task=0) failed during processing with trace:"
    }
    assert ResultStore.in_dir(tmp_path).get(spec.name)["status"] == "failed"


class _QueuedJob:
    """A Slurm task as the runner sees it: its id, where submitit would put its result, its result."""

    def __init__(self, job_id: str, folder: Path) -> None:
        self.job_id = job_id
        self.paths = SimpleNamespace(
            folder=folder, result_pickle=folder / f"{job_id}_0_result.pkl", stderr=folder / f"{job_id}_0_log.err"
        )
        self.cancelled = False

    def result(self) -> TaskEnd:
        return TaskEnd()

    def cancel(self, check: bool = True) -> None:
        self.cancelled = True


class _Queue:
    """squeue over time: at each look, the listed tasks' states, and the tasks whose results appear then."""

    def __init__(self, jobs: dict[str, _QueuedJob], looks: list[tuple[dict[str, str], set[str]]]) -> None:
        self.jobs, self.looks, self.asked = jobs, looks, []

    def __call__(self, job_ids: list[str]) -> dict[str, str]:
        self.asked.append(job_ids)
        states, results = self.looks[min(len(self.asked), len(self.looks)) - 1]
        for task_id in results:
            self.jobs[task_id].paths.result_pickle.touch()
        return states


def _slurm_runner(
    tmp_path: Path, monkeypatch, looks: list[tuple[dict[str, str], set[str]]]
) -> tuple[SubmititRunner, dict, _Queue]:
    """A runner that takes its jobs' states from ``looks`` instead of squeue, and looks often."""
    folder = tmp_path / "submitit"
    folder.mkdir()
    jobs = {f"5_{index}": _QueuedJob(f"5_{index}", folder) for index in range(3)}
    queue = _Queue(jobs, looks)
    monkeypatch.setattr(cluster, "queue_states", queue)
    monkeypatch.setattr(cluster, "QUEUE_POLL_S", (0.001, 0.001))
    monkeypatch.setattr(cluster, "RESULT_POLL_S", 0.001)
    monkeypatch.setattr(
        SubmititRunner,
        "executor",
        lambda self, folder: SimpleNamespace(map_array=lambda fn, tasks: list(jobs.values())),
    )
    slurm = SubmititRunner(ClusterOptions(engine="debug"))  # made without asking Slurm ...
    slurm.options = replace(slurm.options, engine="slurm", lost_after_s=1e-6)  # ... then watched as Slurm's
    return slurm, jobs, queue


def test_a_slurm_task_that_leaves_the_queue_without_a_result_is_failed_and_a_requeued_one_waited_for(
    tmp_path: Path, monkeypatch
) -> None:
    looks = [
        ({"5_0": "RUNNING", "5_1": "CANCELLED"}, set()),  # 5_2 not listed (requeued, say)
        ({"5_0": "COMPLETED", "5_1": "CANCELLED", "5_2": "PENDING"}, {"5_0"}),  # 5_1 still out: lost; 5_2 back
        ({"5_2": "COMPLETED"}, set()),  # 5_1 forgotten by the controller; 5_2's result not seen yet (a slow NFS)
        ({"5_2": "COMPLETED"}, {"5_2"}),
    ]
    slurm, jobs, queue = _slurm_runner(tmp_path, monkeypatch, looks)
    tasks = [Task(({"name": name},), str(tmp_path), name) for name in jobs]
    ended: list[tuple[str, TaskEnd]] = []
    slurm(tasks, lambda task: None, lambda task, end: ended.append((task.attempt, end)))
    assert ended == [
        ("5_1", TaskEnd(error="cluster job 5_1 ended without a result (CANCELLED)")),
        ("5_0", TaskEnd()),
        ("5_2", TaskEnd()),
    ]
    assert set(map(tuple, queue.asked)) == {("5",)} and len(queue.asked) == len(looks)


def test_a_sweep_that_stops_cancels_the_slurm_tasks_it_still_waits_for(tmp_path: Path, monkeypatch) -> None:
    slurm, jobs, _ = _slurm_runner(tmp_path, monkeypatch, [({"5_1": "RUNNING", "5_2": "PENDING"}, {"5_0"})])

    def interrupted(task: Task, end: TaskEnd) -> None:
        raise KeyboardInterrupt

    tasks = [Task(({"name": name},), str(tmp_path), name) for name in jobs]
    with pytest.raises(KeyboardInterrupt):
        slurm(tasks, lambda task: None, interrupted)
    assert {name: job.cancelled for name, job in jobs.items()} == {"5_0": False, "5_1": True, "5_2": True}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1-00:00:00", 1440), ("4:00:00", 240), ("30:00", 30), ("30:01", 31), ("infinite", None), ("n/a", None)],
)
def test_slurm_time_limits_read_as_minutes(text: str, expected: int | None) -> None:
    assert minutes(text) == expected


def test_slurm_is_refused_in_one_line_where_there_is_none(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    with pytest.raises(ValueError, match="no Slurm here"):
        SubmititRunner(ClusterOptions())
    grid = tmp_path / "grid.toml"
    grid.write_text("[fixed]\nepochs = 1\n")
    assert main(["sweep", str(grid), "--out", str(tmp_path / "out"), "--executor", "slurm", "--no-progress"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="array_parallelism must be a whole number >= 1"):
        ClusterOptions(array_parallelism=0)
    with pytest.raises(ValueError, match="lost_after_s must be a number of seconds > 0"):
        ClusterOptions(lost_after_s=0)
