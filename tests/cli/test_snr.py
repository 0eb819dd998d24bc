"""``iwae snr`` (iwae.cli.snr): on a fresh model, a run and Rainforth et al.'s Gaussian model; the usual layout,
one-line errors, usage errors without torch, and the help naming the study's defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from parsers import subparsers

from iwae.cli import build_parser, main
from iwae.config import TrainConfig
from iwae.models import ModelConfig
from iwae.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUT = {"ks", "estimators", "repeats", "batch_size", "snr_floor", "slope_method", "slopes", "slope_fits",
          "median_snr", "median_ess", "ess_slope", "n_parameters", "png", "json"}  # fmt: skip


def test_snr_help_names_the_studys_default_ks() -> None:
    from iwae.studies.snr import DEFAULT_KS

    snr = subparsers(build_parser())["snr"]
    assert ",".join(map(str, DEFAULT_KS)) in " ".join(snr.format_help().split())


def test_snr_cli_on_a_fresh_model_and_a_run(tmp_path: Path, capsys, mnist) -> None:
    code = main(["snr", "--ks", "1,3", "--repeats", "3", "--json", "--out", str(tmp_path / "fresh"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    summary = json.loads(captured.out)
    assert set(summary["slopes"]) == {"encoder", "decoder"}
    assert set(summary["slopes"]["encoder"]) == {"standard", "stl", "dreg"}
    assert (tmp_path / "fresh" / "snr.png").stat().st_size > 0
    assert json.loads((tmp_path / "fresh" / "snr.json").read_text())["slopes"] == summary["slopes"]

    config = TrainConfig(k=2, model=ModelConfig(784, (4,), ((16,),)), stages=((1, 1e-3),), train_limit=20, valid_k=2)
    fit(config, tmp_path / "run", dataset=mnist, progress=False, device="cpu")
    argv = ["snr", str(tmp_path / "run"), "--ks", "1,4,16", "--repeats", "4", "--estimators", "dreg", "--no-progress"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0 and "median SNR" in captured.err  # the table goes to stderr without --json
    summary = json.loads(captured.out)
    assert list(summary["slopes"]["decoder"]) == ["dreg"] and "ci95_low" in summary["slope_fits"]["encoder"]["dreg"]
    assert Path(summary["png"]) == tmp_path / "run" / "snr" / "snr.png"


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--repeats", "1"], "repeats"), (["--estimators", "reinforce"], "unknown estimator"), (["--ks", "0"], ">= 1")],
)
def test_snr_cli_errors(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    code = main(["snr", "--ks", "1,2", "--out", str(tmp_path), "--no-progress", *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_snr_cli_rainforth_writes_the_usual_layout(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["snr", "--model", "rainforth", "--ks", "1,10", "--repeats", "100", "--max-samples", "1e4",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "median SNR" in captured.err and "bootstrap" in captured.err  # the table goes to stderr without --json
    assert set(summary) >= LAYOUT and summary["model"] == "rainforth"
    assert set(summary["slopes"]) == {"encoder", "decoder"} and set(summary["slopes"]["encoder"]) == {
        "standard", "stl", "dreg"
    }  # fmt: skip
    assert summary["n_parameters"]["dreg"] == {"encoder": [420, 420], "decoder": [20, 20]}
    assert all(r >= 100 for reps in summary["repeats_per_k"].values() for r in reps)
    assert summary["checks"]["log_px_exact"] > summary["checks"]["elbo_exact"]
    assert json.loads((out / "snr.json").read_text())["slope_fits"] == summary["slope_fits"]
    assert (out / "snr.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "rainforth", "RUN"], "drop the run directory"),
        (["--model", "gaussian"], "invalid choice"),
        (["--max-samples", "1e4"], "only with --model rainforth"),
        (["--model", "rainforth", "--batch-size", "2000"], "between 1 and 1024"),
        (["--model", "rainforth", "--estimators", "reinforce"], "unknown estimator"),
        (["--model", "rainforth", "--repeats", "1"], "repeats"),
        (["--model", "rainforth", "--max-samples", "1.5"], "whole number"),
        (["--model", "rainforth", "--rel-error", "0"], "> 0"),
    ],
)
def test_snr_cli_rainforth_errors(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "out"
    argv = ["snr", "--ks", "1,2", "--out", str(out), "--no-progress", *[str(run) if a == "RUN" else a for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_snr_cli_rainforth_usage_errors_import_no_torch(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from iwae.cli import main\n"
        f"assert main(['snr', '--model', 'rainforth', {str(tmp_path)!r}]) == 2\n"
        "assert main(['snr', '--model', 'rainforth', '--estimators', 'nope']) == 2\n"
        "assert 'torch' not in sys.modules\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_snr_help_names_the_studys_rainforth_defaults() -> None:
    from iwae.studies.snr import DEFAULT_FLOOR_FACTOR, DEFAULT_MAX_SAMPLES, DEFAULT_REL_ERROR

    parser = subparsers(build_parser())["snr"]
    text = " ".join(parser.format_help().split())
    assert "K at most (default 1e8)" in text and DEFAULT_MAX_SAMPLES == 10**8
    assert "<= this (default 0.1)" in text and DEFAULT_REL_ERROR == 0.1
    assert "its repeats (default 3)" in text and DEFAULT_FLOOR_FACTOR == 3
