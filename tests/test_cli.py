"""The command line: a smoke run of train, eval and sample on a small subset, and its error contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from iwae.cli import main
from iwae.fast import allocator

EVAL_KEYS = {"nll", "k", "split", "n_examples", "active_units"}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_eval_sample_smoke(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    configured = []  # train sets up malloc first (iwae.fast.allocator); eval and sample leave it alone
    monkeypatch.setattr(allocator, "configure", lambda: configured.append(True) or "recorded")
    run = str(tmp_path / "run")
    code, out, _ = _run(
        capsys, "train", "--objective", "iwae", "--k", "2", "--layers", "2", "--epochs", "1",
        "--train-limit", "200", "--out", run, "--no-progress", "--device", "cpu",
    )  # fmt: skip
    assert code == 0
    summary = json.loads(out)
    assert summary["complete"] and summary["epochs_done"] == 1
    code, out, _ = _run(capsys, "eval", run, "--k", "20", "--limit", "30", "--no-progress", "--device", "cpu")
    assert code == 0
    result = json.loads(out)
    assert set(result) >= EVAL_KEYS
    assert result["k"] == 20 and result["n_examples"] == 30 and result["split"] == "test"
    assert len(result["active_units"]) == 2
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["nll"] == result["nll"] and "log_activity" in saved
    code, out, _ = _run(capsys, "sample", run, "--device", "cpu")
    assert code == 0
    png = Path(json.loads(out)["png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(configured) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--layers", "3", "--out", "x"],
        ["train", "--k", "0", "--out", "x"],
        ["train", "--epochs", "2", "--schedule", "burda", "--out", "x"],
        ["train", "--schedule", "burda:12", "--out", "x"],
        ["eval", "/nonexistent/run"],
        ["sample", "/nonexistent/run"],
        ["frobnicate"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv: list[str]) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_existing_run_is_never_overwritten(tmp_path: Path, capsys) -> None:
    args = ["train", "--epochs", "1", "--train-limit", "40", "--out", str(tmp_path / "r"), "--no-progress"]
    assert _run(capsys, *args)[0] == 0
    before = (tmp_path / "r" / "model.safetensors").read_bytes()
    code, _, err = _run(capsys, *args)
    assert code == 2 and "--resume" in err
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before


def test_console_entry_point() -> None:
    completed = subprocess.run([sys.executable, "-m", "iwae", "--version"], capture_output=True, text=True, check=True)
    assert completed.stdout.startswith("iwae ")
