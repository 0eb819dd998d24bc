"""One writer per run: two ``iwae train`` on one new ``--out`` at once, or a resume while a sweep's worker trains
the run, end with one run trained once; the other command says why in one line, exit code 2 (issue 25)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lock_holders import held_by_another_thread

from iwae import runs
from iwae.cli import main

TRAIN = ["train", "--epochs", "3", "--train-limit", "100", "--latent-dims", "4", "--no-progress", "--device", "cpu"]
REFUSALS = ("is in use by pid", "changed while this call checked it", "already holds a run")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_commands_started_together_on_one_new_out_train_it_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "iwae", *TRAIN, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    both = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]  # fmt: skip
    ended = [(process.wait(300), *process.communicate()) for process in both]
    codes = sorted(code for code, _, _ in ended)
    assert codes == [0, 2], ended
    (_, _, refused), = [end for end in ended if end[0] == 2]
    assert len(refused.strip().splitlines()) == 1 and any(reason in refused for reason in REFUSALS), refused
    assert [record["epoch"] for record in runs.read_metrics(out)] == [1, 2, 3]  # not interleaved, not twice
    assert (out / runs.MODEL_FILE).is_file()


def test_a_resume_while_another_writer_holds_the_run_changes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main([*TRAIN, "--max-epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    with held_by_another_thread(out / runs.LOCK_FILE, what="a sweep's worker"):  # as runs/NAME/.lock of a sweep
        before = sorted((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in out.iterdir())
        assert main([*TRAIN, "--resume", "--out", str(out)]) == 2
    _, err = capsys.readouterr()
    assert err.startswith(f"error: run {out} is in use by pid ") and err.count("\n") == 1, err
    assert sorted((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in out.iterdir()) == before
    assert main([*TRAIN, "--resume", "--out", str(out)]) == 0  # free again: it resumes
    assert json.loads(capsys.readouterr().out)["complete"] is True
