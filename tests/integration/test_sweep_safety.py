"""A sweep owns its folder and a worker its run; workers end with their sweep; names stay inside --out; bad grids
change nothing; failed or diverged runs make the sweep exit 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest
from lock_holders import held_by_another_thread
from tiny_runs import TINY as LAB_TINY

from iwae import locks, runs
from iwae.cli import main
from iwae.cli.sweep import _finish
from iwae.lab import run as lab_run
from iwae.lab.grid import expand_grid, load_grid
from iwae.lab.reports import load_records, write_report
from iwae.lab.run import RESULT_FILE
from iwae.lab.store import ResultStore
from iwae.lab.sweep import SWEEP_LOCK, execute, resolved_specs, run_sweep
from iwae.runs import LOCK_FILE as RUN_LOCK

IWAE = [sys.executable, "-m", "iwae"]
TINY = {**LAB_TINY, "epochs": 1}  # the lab's tiny run, one pass


def _toml(grid: dict) -> str:
    """A flat grid ([fixed] and [axes] of scalars and lists) as TOML."""
    lines = []
    for table in (table for table in ("fixed", "axes") if table in grid):
        lines.append(f"[{table}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in grid.get(table, {}).items()]
    return "\n".join(lines) + "\n"


def _living_members(group: int) -> list[str]:
    """The processes of process group ``group`` that are not zombies, as 'pid state command' (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError):
            stat = (entry / "stat").read_text()
            state, _, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
            if int(pgrp) == group and state != "Z":
                members.append(f"{entry.name} {state} {(entry / 'cmdline').read_bytes()[:80]!r}")
    return members


# -- the sweep folder and the run directories --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_sweep_takes_its_workers_with_it_and_a_second_sweep_is_refused(tmp_path: Path) -> None:
    grid = {"fixed": {**TINY, "train_limit": 1000, "epochs": 500, "k": 2}, "axes": {"objective": ["vae", "iwae"]}}
    (tmp_path / "grid.toml").write_text(_toml(grid))
    out = tmp_path / "sweep"
    argv = [*IWAE, "sweep", str(tmp_path / "grid.toml"), "--out", str(out), "--device", "cpu", "--no-progress"]
    sweep = subprocess.Popen([*argv, "--workers", "2", "--stack", "off"], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not all((out / "runs" / name / runs.METRICS_FILE).is_file() for name in ("vae", "iwae")):
            assert sweep.poll() is None and time.monotonic() < deadline, "the workers never started training"
            time.sleep(0.2)
        assert len(_living_members(sweep.pid)) >= 4  # the sweep, the forkserver, two workers (and the tracker)

        second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and f"pid {sweep.pid} on host" in second.stderr, second.stderr

        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait()
        killed = time.monotonic()
        while _living_members(sweep.pid) and time.monotonic() - killed < 5:
            time.sleep(0.05)
        assert _living_members(sweep.pid) == [], "processes outlived their sweep"
        print(f"workers gone {time.monotonic() - killed:.2f} s after kill -9")
        rows = ResultStore.in_dir(out).rows()
        time.sleep(1.5)
        assert ResultStore.in_dir(out).rows() == rows  # nobody writes after the sweep is gone
        for name in ("vae", "iwae"):  # and the runs are free for the next sweep
            with locks.hold(out / "runs" / name / RUN_LOCK, what=name):
                pass
    finally:
        with suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)


HOLDER = """
import sys
from iwae import locks
with locks.hold(sys.argv[1], what="test"):
    print("held", flush=True)
    sys.stdin.readline()  # until the test lets go
"""


def test_a_second_sweep_stops_with_one_line_or_waits(tmp_path: Path) -> None:
    (tmp_path / "grid.toml").write_text(_toml({"fixed": {**TINY, "objective": "iwae", "k": 2}}))
    out = tmp_path / "sweep"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / SWEEP_LOCK)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        argv = [*IWAE, "sweep", str(tmp_path / "grid.toml"), "--out", str(out), "--device", "cpu", "--no-progress"]
        refused = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.count("\n") == 1 and f"pid {holder.pid} on host" in refused.stderr
        assert "--wait" in refused.stderr and not (out / "results.sqlite").exists()
        waiting = subprocess.Popen([*argv, "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = waiting.stderr.readline()
        assert line.startswith(f"waiting: sweep folder {out} is in use by pid {holder.pid}")
        time.sleep(1)
        assert waiting.poll() is None and not (out / "results.sqlite").exists()  # still waiting
        holder.communicate("go\n", timeout=30)
        stdout, _ = waiting.communicate(timeout=180)
        assert waiting.returncode == 0 and json.loads(stdout)["ran"] == 1
    finally:
        holder.kill()
        holder.wait()


def test_a_run_held_by_another_process_is_not_trained_twice(tmp_path: Path) -> None:
    grid = {"fixed": {**TINY, "objective": "iwae", "k": 2}}
    (spec,) = resolved_specs(grid, tmp_path)
    run_dir = tmp_path / "runs" / spec.name
    run_dir.mkdir(parents=True)
    with held_by_another_thread(run_dir / RUN_LOCK):
        [(name, status, error)] = execute([spec.to_dict()], tmp_path, device="cpu")
        assert (name, status) == (spec.name, "busy") and f"pid {os.getpid()} on host" in error
        assert not (run_dir / runs.CONFIG_FILE).exists() and not (tmp_path / "results.sqlite").exists()
        summary = run_sweep(grid, tmp_path, device="cpu", progress=False)  # its worker finds the run held
        assert list(summary["busy"]) == [spec.name] and summary["failed"] == {}
        row = ResultStore.in_dir(tmp_path).get(spec.name)
        assert row["status"] == "pending" and "in use by" in row["error"]
        assert not (run_dir / runs.CONFIG_FILE).exists()


# -- names stay inside --out ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "grid",
    [
        {"name": "../../x", "fixed": TINY},
        {"name": "/tmp/abs", "fixed": TINY},
        {"name": "", "fixed": TINY},
        {"name": "a/b", "fixed": TINY},
        {"name": 5, "fixed": TINY},
        {"fixed": TINY, "phase": [{"name": "../x", "axes": {"k": [1]}}]},
        {"fixed": TINY, "phase": [{"name": "ok"}, {"name": "..", "axes": {"k": [1]}}]},
        {"fixed": TINY, "axes": {"objective": [".."]}},
    ],
)
def test_phase_and_run_names_are_single_safe_path_components(tmp_path: Path, grid: dict) -> None:
    with pytest.raises(ValueError, match=r"(phase|run) name .*no path separators"):
        run_sweep(grid, tmp_path / "out", device="cpu", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_run_directory_that_resolves_outside_the_sweep_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "out" / "runs").mkdir(parents=True)
    (tmp_path / "out" / "runs" / "iwae").symlink_to(outside, target_is_directory=True)
    grid = {"fixed": {**TINY, "k": 2}, "axes": {"objective": ["iwae"]}}
    with pytest.raises(ValueError, match="outside the sweep folder"):
        run_sweep(grid, tmp_path / "out", device="cpu", progress=False)
    assert list(outside.iterdir()) == [] and not (tmp_path / "out" / "results.sqlite").exists()


def _finished_row(store: ResultStore, name: str, run_dir: Path, samples: Path) -> None:
    evaluation = {"nll": 90.0, "active_units": [3], "k": 4, "n_examples": 20, "recon_log_lik": -80.0, "kl": 10.0}
    store.upsert(name, config={**TINY, "objective": "iwae", "k": 2, "seed": len(name)}, status="finished",
                 run_dir=str(run_dir), eval=evaluation, metrics=[], seconds_per_epoch=1.0, train_bound=-95.0,
                 valid_bound=-94.0, samples_png=str(samples))  # fmt: skip


def test_a_report_embeds_only_files_inside_the_sweep_folders(tmp_path: Path) -> None:
    sweep, secret = tmp_path / "sweep", tmp_path / "secret.png"
    (sweep / "runs" / "a").mkdir(parents=True)
    secret.write_bytes(b"\x89PNG not to be embedded")
    (sweep / "runs" / "a" / "samples.png").write_bytes(b"\x89PNG ours")
    store = ResultStore.in_dir(sweep)
    _finished_row(store, "a", sweep / "runs" / "a", sweep / "runs" / "a" / "samples.png")
    _finished_row(store, "bb", sweep / "runs" / "bb", secret)
    _finished_row(store, "ccc", sweep / "runs" / "ccc", sweep / "runs" / ".." / ".." / "secret.png")
    records, _ = load_records([sweep])
    assert {r.label: r.samples_png for r in records} == {"a": str(sweep / "runs" / "a" / "samples.png"), "bb": None,
                                                         "ccc": None}  # fmt: skip
    written = write_report([sweep], tmp_path / "report")
    figures = sorted(path.name for path in Path(written["figures"]).iterdir())
    assert [name for name in figures if name.startswith("samples")] == ["samples_a.png"]


# -- bad grids: one line, exit 2, nothing written ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fixed", "message"),
    [
        ({"train_limit": -5}, "train_limit must be a whole number >= 1"),
        ({"eval_k": 0}, "eval_k must be a whole number >= 1"),
        ({"eval_split": "validation"}, "eval_split must be test, train or valid"),
        ({"k": 1.5}, "k must be a whole number"),
        ({"lr": "fast"}, "learning rate must be a finite number > 0"),
        ({"epochs": 2.5}, "epochs must be a whole number >= 1"),
        ({"eval_limit": 0}, "eval_limit must be a whole number >= 1"),
        ({"eval_seed": "x"}, "eval_seed must be a whole number"),
        ({"eval_batch_size": 0}, "eval_batch_size must be a whole number >= 1"),
        ({"samples": "yes"}, "samples must be true or false"),
        ({"dataset": "cifar"}, "dataset must be one of"),
        ({"beta1": 1.5}, r"beta1 \(Adam\) must be a number in \[0, 1\)"),
        ({"init_from": "/no/such/run"}, "neither a run of this grid nor a finished run directory"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path: Path, fixed: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_sweep({"fixed": {**TINY, **fixed}}, tmp_path / "out", device="cpu", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"fixed": 3}, r"\[fixed\] must be a table"),
        ({"axes": [1]}, r"\[axes\] must be a table"),
        ({"axes": {"k": 3}}, "non-empty list"),
        ({"phase": {"name": "a"}}, "non-empty array of tables"),
        ({"phase": [3]}, "must be a table"),
        ({"name": "a", "phase": [{"name": "b"}]}, "holds \\[fixed\\] and the phases only"),
    ],
)
def test_malformed_grids_are_one_line_errors(grid: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expand_grid(grid)


def test_the_cli_refuses_a_bad_grid_in_one_line_with_nothing_written(tmp_path: Path, capsys) -> None:
    (tmp_path / "grid.toml").write_text(_toml({"fixed": {**TINY, "eval_k": 0}}))
    assert main(["sweep", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval_k must be a whole number >= 1, got 0" in err
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "out"), "--partition", "gpu"]) == 2
    assert "--partition goes with --executor slurm" in capsys.readouterr().err


# -- failed and diverged runs --------------------------------------------------------------------------------------
def test_a_sweep_whose_runs_fail_exits_1_with_its_summary(tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(
        _toml({"fixed": {**TINY, "k": 2}})
        + '[[phase]]\nname = "base"\n[phase.fixed]\nlatent_dims = [4]\n[phase.axes]\nobjective = ["iwae"]\n'
        + '[[phase]]\nname = "cont"\n[phase.fixed]\nlatent_dims = [5]\ninit_from = "base-iwae"\n'
    )  # the continued run has another architecture than its base: it fails as it loads the base's weights
    assert [s.name for s in expand_grid(load_grid(grid))] == ["base-iwae", "cont"]
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(grid), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["ran"] == 2 and list(summary["failed"]) == ["cont"] and "architecture" in summary["failed"]["cont"]
    assert captured.err.strip().splitlines()[-1].startswith(f"sweep {tmp_path / 'out'}: of 2 runs, 1 failed (cont)")
    assert ResultStore.in_dir(tmp_path / "out").get("cont")["status"] == "failed"


def test_a_diverged_run_is_recorded_as_diverged(tmp_path: Path, monkeypatch) -> None:
    class DivergenceError(runs.RunError):  # the training loop's, where it exists
        pass

    monkeypatch.setattr(runs, "DivergenceError", DivergenceError, raising=False)

    def diverge(*args, **kwargs):
        raise DivergenceError("training diverged in epoch 1 at learning rate 0.1 (the bound is nan)")

    monkeypatch.setattr(lab_run, "run_one", diverge)
    (spec,) = resolved_specs({"fixed": {**TINY, "k": 2}}, tmp_path)
    [(name, status, error)] = execute([spec.to_dict()], tmp_path, device="cpu")
    assert status == "diverged" and "training diverged in epoch 1" in error
    row = ResultStore.in_dir(tmp_path).get(name)
    assert row["status"] == "diverged" and row["error"] == error
    assert json.loads((tmp_path / "runs" / name / RESULT_FILE).read_text())["status"] == "diverged"


def test_the_exit_summary_names_every_kind_of_trouble(capsys) -> None:
    summary = {"out": "DIR", "runs": 5, "failed": {"a": "x"}, "diverged": {"b": "y", "c": "z"}, "busy": {}}
    with pytest.raises(SystemExit) as exit_:
        _finish(summary)
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == summary
    assert captured.err == "sweep DIR: of 5 runs, 1 failed (a), 2 diverged (b, c); see 'iwae results DIR'\n"
    clean = {**summary, "failed": {}, "diverged": {}}
    assert _finish(clean) is clean
