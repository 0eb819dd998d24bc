"""One run (iwae.lab.run): resuming an interrupted run, re-evaluating a finished one, failures and the environment
recorded, and --init-from (a run that starts from another's final weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_runs import TINY

from iwae import runs
from iwae.lab.grid import RunSpec, train_config
from iwae.lab.run import run_one
from iwae.lab.store import ResultStore
from iwae.lab.sweep import execute
from iwae.models import ModelConfig
from iwae.train import build_model, fit, load_initial_weights


def test_interrupted_run_resumes_to_completion(tmp_path: Path, mnist) -> None:
    options = {**TINY, "objective": "iwae", "k": 2, "epochs": 3}
    run_dir = tmp_path / "run"
    partial = fit(train_config(options), run_dir, dataset=mnist, progress=False, device="cpu", max_epochs=1)
    assert not partial.complete
    summary = run_one(options, run_dir, device="cpu", dataset=mnist)  # picks up the checkpoint
    assert summary["epochs_done"] == 3
    assert [m["epoch"] for m in summary["metrics"]] == [1, 2, 3]
    assert (run_dir / runs.MODEL_FILE).is_file()
    evaluation = json.loads((run_dir / runs.EVAL_FILE).read_text())
    assert evaluation["k"] == 4 and evaluation["n_examples"] == 20 and summary["eval"] == evaluation
    assert evaluation["eval_settings"]["eval_k"] == 4 and (run_dir / "eval-test-k4-seed0-limit20.json").is_file()
    assert summary["valid_bound"] == summary["metrics"][-1]["valid_L2"]
    again = run_one(options, run_dir, device="cpu", dataset=mnist)  # finished: nothing is retrained or re-evaluated
    assert again["eval"] == summary["eval"] and again["metrics"] == summary["metrics"]
    trained = (run_dir / runs.MODEL_FILE).stat().st_mtime_ns
    other_eval = run_one(options | {"eval_k": 6}, run_dir, device="cpu", dataset=mnist)  # re-evaluated only
    assert other_eval["eval"]["k"] == 6 and (run_dir / runs.MODEL_FILE).stat().st_mtime_ns == trained
    assert other_eval["metrics"] == summary["metrics"]


def test_execute_records_failures_and_environment(tmp_path: Path) -> None:
    spec = RunSpec("bad", "", {**TINY, "objective": "iwae", "k": 1, "epochs": 1, "init_from": str(tmp_path / "none")})
    [(name, status, error)] = execute([spec.to_dict()], tmp_path, device="cpu")
    assert (name, status) == ("bad", "failed") and "not a run directory" in error
    row = ResultStore.in_dir(tmp_path).get("bad")
    assert row["status"] == "failed" and "not a run directory" in row["error"]
    assert row["torch_version"] == torch.__version__ and row["package_version"]
    assert row["git_commit"] is None or len(row["git_commit"]) == 40


def test_init_from_starts_from_the_final_weights(tmp_path: Path, mnist) -> None:
    base_options = {**TINY, "objective": "vae", "k": 1, "epochs": 1}
    fit(train_config(base_options), tmp_path / "base", dataset=mnist, progress=False, device="cpu")
    config = train_config({**base_options, "objective": "iwae", "k": 3, "init_from": str(tmp_path / "base")})
    model = build_model(config, mnist.train.images[:100], torch.device("cpu"))
    load_initial_weights(model, config)
    base_model, _ = runs.load_model(tmp_path / "base")
    for (name, value), (_, expected) in zip(model.state_dict().items(), base_model.state_dict().items(), strict=True):
        assert torch.equal(value, expected), name
    # a run continued at a negligible learning rate ends where the base run ended
    cont = fit(config.replace(stages=((1, 1e-12),)), tmp_path / "cont", dataset=mnist, progress=False, device="cpu")
    assert cont.complete
    continued, _ = runs.load_model(tmp_path / "cont")
    for name, value in continued.state_dict().items():
        assert torch.allclose(value, base_model.state_dict()[name], atol=1e-6), name
    with pytest.raises(runs.RunError, match="architecture differs"):
        other = config.replace(model=ModelConfig(784, (5,), ((200, 200),)))
        load_initial_weights(build_model(other, mnist.train.images[:100], torch.device("cpu")), other)


def test_cli_train_accepts_init_from(tmp_path: Path) -> None:
    from iwae.cli import build_parser
    from iwae.cli.run import _train_config

    argv = ["train", "--out", str(tmp_path / "x"), "--init-from", "some/run", "--epochs", "1"]
    args = build_parser().parse_args(argv)
    assert _train_config(args).init_from == str(Path("some/run").resolve())
    args = build_parser().parse_args(["train", "--out", str(tmp_path / "x"), "--epochs", "1"])
    assert _train_config(args).init_from is None
