"""Divergence stops loudly (issue 18): a non-finite bound or parameter stops training with one line and a non-zero
exit, nothing non-finite is written (each run keeps its last finite checkpoint), JSON output stays JSON, and
evaluating a non-finite model fails in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from iwae import config as config_module
from iwae import runs
from iwae.checkpoint import load_checkpoint, load_model_state, nonfinite_tensors, save_model
from iwae.cli import finite_json, main
from iwae.config import TrainConfig
from iwae.models import LatentVariableModel, ModelConfig
from iwae.runs import DivergenceError
from iwae.train import fit, fit_runs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--train-limit", "100", "--latent-dims", "4", "--no-progress", "--device", "cpu"]
SMALL = ModelConfig(x_dim=784, latent_dims=(4,), hidden_dims=((16,),))
# A first stage that trains well, then a learning rate that sends the parameters to infinity at once.
GOOD_THEN_HUGE = ((1, 1e-3), (1, 1e10))


def _config(**changes) -> TrainConfig:
    base = TrainConfig(k=2, model=SMALL, stages=GOOD_THEN_HUGE, train_limit=100, valid_k=5)
    return base.replace(**changes)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _strict_json(text: str) -> list[dict]:
    def refuse(constant: str):
        raise AssertionError(f"{constant} in the JSON output")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def _assert_kept_at_epoch(run_dir: Path, epoch: int) -> None:
    """The run's last checkpoint is intact at ``epoch``, finite, and nothing of the diverged epoch was written."""
    state = load_checkpoint(run_dir / runs.CHECKPOINT_FILE)
    assert state.progress["epochs_done"] == epoch
    assert nonfinite_tensors(state.model_state) == []
    assert not (run_dir / runs.MODEL_FILE).exists()
    assert [record["epoch"] for record in runs.read_metrics(run_dir)] == list(range(1, epoch + 1))


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- the command line -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seeds", [None, "0,1"], ids=["single", "stack-of-2"])
def test_a_huge_learning_rate_stops_in_one_line_and_writes_nothing_non_finite(
    tmp_path: Path, capsys, seeds: str | None
) -> None:
    run = tmp_path / "run"
    which = ["--seed", "0"] if seeds is None else ["--seeds", seeds]
    code, out, err = _run(capsys, "train", "--epochs", "2", "--lr", "1e10", *TINY, *which, "--out", str(run))
    assert code == 2 and out == ""
    line = _one_line(err)
    assert "diverged in epoch 1" in line and "no checkpoint had been written yet" in line and "--lr" in line
    run_dirs = [run] if seeds is None else [run / "seed-0", run / "seed-1"]
    for run_dir in run_dirs:
        assert str(run_dir) in line
        assert sorted(p.name for p in run_dir.iterdir()) == [runs.LOCK_FILE, runs.CONFIG_FILE]  # no checkpoint


@pytest.mark.parametrize("seeds", [None, "0,1"], ids=["single", "stack-of-2"])
def test_the_last_finite_checkpoint_is_kept(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, seeds: str | None
) -> None:
    """Burda's schedule, patched to a good stage and a divergent one: the checkpoint of the good stage's end stays."""
    monkeypatch.setattr(config_module, "BURDA_STAGES", GOOD_THEN_HUGE)
    run = tmp_path / "run"
    which = ["--seed", "0"] if seeds is None else ["--seeds", seeds]
    code, out, err = _run(capsys, "train", "--schedule", "burda:2", *TINY, *which, "--out", str(run))
    assert code != 0 and out == ""
    line = _one_line(err)
    assert "diverged in epoch 2" in line and "(epoch 1)" in line
    for run_dir in [run] if seeds is None else [run / "seed-0", run / "seed-1"]:
        _assert_kept_at_epoch(run_dir, 1)


def test_json_output_is_strict_json(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    code, out, _ = _run(capsys, "train", "--epochs", "1", *TINY, "--out", str(run))
    assert code == 0 and _strict_json(out)[0]["complete"]
    code, out, _ = _run(capsys, "eval", str(run), "--k", "3", "--limit", "2", "--no-progress", "--device", "cpu")
    assert code == 0 and _strict_json(out)[0]["n_examples"] == 2
    assert finite_json({"a": [1.0, float("nan")], "b": (float("-inf"), "x")}) == {"a": [1.0, None], "b": [None, "x"]}


def _finished_run(tmp_path: Path, name: str = "run") -> Path:
    run = tmp_path / name
    assert main(["train", "--epochs", "1", *TINY, "--out", str(run)]) == 0
    return run


def _rewrite_model(run: Path, change) -> None:
    path = run / runs.MODEL_FILE
    state, config_json = load_model_state(path)
    model = LatentVariableModel(runs.load_config(run).model)
    model.load_state_dict({name: change(name, value) for name, value in state.items()})
    save_model(path, model, config_json)


@pytest.mark.parametrize("fault", ["nan-parameter", "huge-parameters"])
def test_eval_of_a_non_finite_model_fails_in_one_line(tmp_path: Path, capsys, fault: str) -> None:
    run = _finished_run(tmp_path)
    capsys.readouterr()
    if fault == "nan-parameter":
        _rewrite_model(run, lambda name, value: value.fill_(math.nan) if name == "decoder.0.head.bias" else value)
    else:  # finite parameters whose L_k is not: the NLL is checked too
        _rewrite_model(run, lambda name, value: value * 1e20)
    before = sorted(p.name for p in run.iterdir())
    code, out, err = _run(capsys, "eval", str(run), "--k", "3", "--limit", "5", "--no-progress", "--device", "cpu")
    assert code == 2 and out == ""
    assert "non-finite" in _one_line(err)
    assert sorted(p.name for p in run.iterdir()) == before  # no eval.json


# -- the library ----------------------------------------------------------------------------------------------------
def test_fit_raises_divergence_error_and_keeps_the_last_checkpoint(tmp_path: Path, mnist) -> None:
    with pytest.raises(DivergenceError) as raised:
        fit(_config(), tmp_path / "run", dataset=mnist, progress=False, device="cpu")
    assert raised.value.epoch == 2 and raised.value.run_dirs == (tmp_path / "run",)
    _assert_kept_at_epoch(tmp_path / "run", 1)
    with pytest.raises(DivergenceError):  # resuming retraces the same steps and stops again, writing nothing
        fit(_config(), tmp_path / "run", dataset=mnist, progress=False, device="cpu", resume=True)
    _assert_kept_at_epoch(tmp_path / "run", 1)


def test_a_stack_names_the_runs_that_diverged_and_keeps_every_checkpoint(tmp_path: Path, mnist) -> None:
    configs = [_config(seed=0), _config(seed=1)]
    dirs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(DivergenceError) as raised:
        fit_runs(configs, dirs, dataset=mnist, progress=False, device="cpu", stack="on")
    assert raised.value.epoch == 2 and raised.value.run_dirs == tuple(dirs)
    for run_dir in dirs:
        _assert_kept_at_epoch(run_dir, 1)


def test_a_stack_in_which_one_run_diverges_names_only_that_one(tmp_path: Path, mnist) -> None:
    hot = _finished_run(tmp_path, "hot")  # finite weights so large that the first step's bound is NaN
    _rewrite_model(hot, lambda name, value: value * 1e20)
    base = TrainConfig(k=2, model=ModelConfig(784, (4,), ((200, 200),)), stages=((2, 1e-3),), train_limit=100)
    configs = [
        base.replace(seed=0),
        base.replace(seed=1, init_from=str(hot), fresh_optimizer=True),  # a fresh run and a fresh optimiser stack
    ]
    dirs = [tmp_path / "calm", tmp_path / "wild"]
    with pytest.raises(DivergenceError) as raised:
        fit_runs(configs, dirs, dataset=mnist, progress=False, device="cpu", stack="on")
    assert raised.value.run_dirs == (dirs[1],)
    message = str(raised.value)
    assert str(dirs[1]) in message and str(dirs[0]) not in message and "1 of the stack's 2 runs" in message
    for run_dir in dirs:  # it diverged in epoch 1: neither run has a checkpoint to keep, and none was written
        assert sorted(p.name for p in run_dir.iterdir()) == [runs.LOCK_FILE, runs.CONFIG_FILE]
