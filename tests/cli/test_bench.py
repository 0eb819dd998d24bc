"""``iwae bench`` and ``iwae gpu-check`` (iwae.cli.bench): the JSON and files of ``iwae bench``, its help and bad
arguments, the benchmark script, and the gpu-check help as docs/cli.md prints it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from iwae.cli import main
from iwae.lab import bench

REPO = Path(__file__).resolve().parents[2]


def test_cli_json_is_one_object_and_out_has_both_files(tiny_result: dict, monkeypatch, capsys, tmp_path) -> None:
    seen = {}

    def fake_run(settings, dataset):
        seen["settings"] = settings
        return tiny_result

    monkeypatch.setattr(bench, "run_bench", fake_run)
    code = main(["bench", "--quick", "--json", "--no-pyro", "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0 and "| layers |" not in err
    assert json.loads(out) == tiny_result
    settings = seen["settings"]
    assert settings.mode == "quick" and not settings.pyro and settings.threads == 1 and settings.ks == (5, 50)
    assert not settings.compile and not tiny_result["compile"]
    assert json.loads((tmp_path / "bench.json").read_text()) == tiny_result
    main(["bench", "--quick", "--json", "--compile", "--no-progress"])
    assert seen["settings"].compile
    assert "| layers | k | batch |" in (tmp_path / "bench.md").read_text()


def test_cli_help_and_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
    assert main(["bench", "--threads", "0"]) == 2
    _, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1


def test_benchmark_script_help() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and "iwae bench" in done.stdout


def test_the_help_says_what_compile_does_on_each_device_as_docs_cli_md_prints_it(monkeypatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "100")  # as docs/cli.md's help texts are taken
    with pytest.raises(SystemExit) as exit_info:
        main(["gpu-check", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "CUDA graphs on CUDA" in " ".join(help_text.split())
    assert "torch.compile on other devices" in " ".join(help_text.split())
    documented = (REPO / "docs" / "cli.md").read_text().split("```text\nusage: iwae gpu-check ", 1)[1]
    assert "usage: iwae gpu-check " + documented.split("```", 1)[0] == help_text


def test_gpu_check_exits_1_and_names_the_phases_that_failed(tmp_path, monkeypatch, capsys) -> None:
    """A check some of whose phases failed prints its summary all the same, one line naming them, and exits 1."""
    import iwae.lab.gpu_check

    def run_check(settings, out, data_dir):
        return {"seconds": 1.0, "errors": [{"phase": "steps", "error": "RuntimeError: CUDA error"}]}

    monkeypatch.setattr(iwae.lab.gpu_check, "run_check", run_check)
    monkeypatch.setattr(iwae.lab.gpu_check, "markdown", lambda result: "summary")
    with pytest.raises(SystemExit) as exited:
        main(["gpu-check", "--smoke", "--out", str(tmp_path / "check")])
    assert exited.value.code == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["seconds"] == 1.0
    assert "phases failed (steps)" in captured.err.splitlines()[-1]
