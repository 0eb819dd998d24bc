"""Sweeps through submitit (iwae.lab.cluster): tasks write result files and never the database (a task alone:
tests/lab/test_runner.py); the sweep indexes them; phases run in order; the Slurm options reach the submission
script."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_runs import TINY as LAB_TINY

from iwae import runs
from iwae.cli import main
from iwae.lab import runner
from iwae.lab.cluster import ClusterOptions, SubmititRunner
from iwae.lab.run import RESULT_FILE
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


def test_the_slurm_options_reach_the_submission_script(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    options = ClusterOptions(partition="gpu", time_limit_min=30, gpus_per_task=1, array_parallelism=4)
    slurm = SubmititRunner(options).executor(tmp_path / "submitit")._executor
    slurm.parameters["map_count"] = 6  # as submitit sets it for an array of six tasks
    script = slurm._make_submission_file_text("python -u -m submitit.core._submit DIR", "uid")
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=1", "--array=0-5%4", "--job-name=iwae-sweep"):
        assert f"#SBATCH {line}\n" in script


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
