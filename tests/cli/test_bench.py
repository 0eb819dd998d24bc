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


def test_memory_json_is_one_object_and_out_has_both_files(monkeypatch, capsys, tmp_path) -> None:
    """``iwae bench --memory`` over the flags' grid, the worker replaced by one answering invented numbers (the real
    measurement: tests/lab/bench/test_training_memory.py)."""
    from iwae.lab.bench import training_memory

    seen = []

    def made_up(task, data_path, arguments, what, environment=None):
        seen.append(arguments)
        return {"gradients": "made up", "allocator": "made up", "steps": 3, "rss_baseline_mb": 300.0,
                "rss_peak_mb": 310.0, "rss_above_baseline_mb": 10.0, "cuda_peak_mb": None,
                "cuda_above_baseline_mb": None, "seconds_per_step": 0.01, "mean_bound": -200.0}  # fmt: skip

    monkeypatch.setattr(training_memory, "run_worker", made_up)
    argv = ["bench", "--memory", "--ks", "1,5", "--layers", "1", "--threads", "1", "--device", "cpu", "--json",
            "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["mode"] == "memory" and "| layers |" not in err
    assert [(r["layers"], r["batch"], r["k"]) for r in result["rows"]] == [(1, 20, 1)] * 3 + [(1, 20, 5)] * 3
    assert len(seen) == 6 and all(a[a.index("--threads") + 1] == "1" for a in seen)
    assert json.loads((tmp_path / "bench-memory.json").read_text()) == result
    assert "| 1 | 20 | 5 | reference |" in (tmp_path / "bench-memory.md").read_text()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--memory", "--ks", "5,0"], "expected numbers >= 1"),
        (["--memory", "--ks", "5,x"], "--ks"),
        (["--memory", "--ks", "5,5"], "without repeats"),
        (["--memory", "--layers", "3"], "--layers"),
        (["--memory", "--quick"], "--memory cannot take --quick"),
        (["--memory", "--stacked", "2", "--compile"], "--memory cannot take --compile, --stacked"),
        (["--memory", "--repeats", "3", "--no-pyro"], "--memory cannot take --repeats, --no-pyro"),
        (["--ks", "1,5"], "--ks only goes with --memory"),
        (["--stacked", "2", "--layers", "1"], "--layers only goes with --memory"),
        (["--batch-sizes", "20"], "--batch-sizes only goes with --stacked or --memory"),
    ],
)
def test_memory_refuses_bad_ks_and_flags_it_cannot_take_in_one_line(argv, says, capsys) -> None:
    assert main(["bench", *argv]) == 2
    _, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and says in err


def test_memory_refuses_a_k_that_iwae_train_would_refuse(capsys) -> None:
    assert main(["bench", "--memory", "--ks", "100000000", "--device", "cpu", "--no-progress"]) == 2
    _, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "lower --k" in err
