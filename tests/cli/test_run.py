"""``iwae train``, ``iwae eval`` and ``iwae sample`` (iwae.cli.run): a smoke run on a small subset, the error
contract, the train parser generated from the settings' table, its choices from the registries, the one config
builder, the authors' flags, objective and estimator flags, and several seeds trained together."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from parsers import option, subparsers

from iwae import cli, runs
from iwae.cli import build_parser, main
from iwae.cli.run import TRAIN_SETTINGS, _train_config
from iwae.fast import allocator
from iwae.settings import COMMAND_LINE

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


def test_train_choices_come_from_the_registries() -> None:
    from iwae.data import DATASETS
    from iwae.estimators import ESTIMATOR_NAMES
    from iwae.objectives import objective_names

    train = subparsers(build_parser())["train"]
    assert tuple(option(train, "--objective").choices) == tuple(objective_names())
    assert tuple(option(train, "--estimator").choices) == tuple(ESTIMATOR_NAMES)
    assert tuple(option(train, "--dataset").choices) == tuple(DATASETS)
    text = train.format_help()
    assert all(name in text for name in objective_names())
    from iwae import names  # the torch-free copies the parser uses are the registries' names

    assert (tuple(DATASETS), tuple(objective_names()), tuple(ESTIMATOR_NAMES)) == (
        names.DATASET_NAMES,
        names.OBJECTIVE_NAMES,
        names.ESTIMATOR_NAMES,
    )


def test_train_arguments_go_through_the_one_config_builder(tmp_path: Path) -> None:
    argv = ["train", "--out", str(tmp_path / "x"), "--init-from", "some/run", "--epochs", "1", "--k", "3"]
    config = _train_config(build_parser().parse_args(argv))
    assert config.init_from == str(Path("some/run").resolve()) and config.k == 3
    assert _train_config(build_parser().parse_args(["train", "--out", "x", "--epochs", "1"])).init_from is None


def test_the_train_parser_is_generated_from_the_table() -> None:
    parser = subparsers(build_parser())["train"]
    actions = {action.dest: action for action in parser._actions}
    assert tuple(s.name for s in COMMAND_LINE) == TRAIN_SETTINGS
    for setting in COMMAND_LINE:
        action = actions[setting.name]
        assert action.option_strings == [setting.option]
        assert action.default is None  # left out: build_train_config's default
        assert action.help == setting.help_text()
        assert action.choices == setting.choices
        assert action.type is setting.kind.parse or setting.kind.parse is None
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    groups = [{a.dest for a in group._group_actions} for group in parser._mutually_exclusive_groups]
    assert sorted(map(sorted, groups)) == [["epochs", "schedule"], ["seed", "seeds"]]


def test_train_arguments_left_out_give_the_default_configuration() -> None:
    from iwae.config import TrainConfig

    assert _train_config(build_parser().parse_args(["train", "--out", "x"])) == TrainConfig()
    argv = ["train", "--out", "x", "--activation", "relu", "--lr-scale", "sqrt", "--batch-size", "80", "--epochs", "2"]
    config = _train_config(build_parser().parse_args(argv))
    assert config.model.activation == "relu" and config.batch_size == 80
    assert config.stages == ((2, pytest.approx(1e-3 * 2)),)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--activation", "gelu"], "argument --activation: invalid choice: 'gelu'"),
        (["--lr-scale", "cube"], "argument --lr-scale: invalid choice: 'cube'"),
        (["--seed", "-1"], "argument --seed: expected a seed 0..4294967295, got -1"),
        (["--batch-size", "0"], "argument --batch-size: expected a number >= 1, got 0"),
        (["--beta1", "1"], r"argument --beta1: expected a number in \[0, 1\)"),
        (["--epochs", "1", "--schedule", "burda"], "not allowed with argument"),
        (["--seed", "1", "--seeds", "1,2"], "not allowed with argument"),
        (["--fresh-optimizer"], "--fresh-optimizer goes with --init-from RUN"),
        (["--k-schedule", "1,2", "--schedule", "burda:3"], "k_schedule needs one k per stage"),
    ],
)
def test_train_usage_errors_are_one_line_and_exit_2(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    assert main(["train", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--protocol", "authors", "--optimizer", "adam"], "protocol 'authors' sets optimizer"),
        (["train", "--fresh-optimizer"], "--fresh-optimizer goes with --init-from"),
        (["train", "--layers", "3"], "needs its sizes"),
        (["train", "--latent-dims", "100,50", "--hidden-dims", "200"], "needs 2 size"),
        (["eval", "RUN", "--protocol", "authors", "--units", "ours"], "--protocol authors sets --units authors"),
    ],
)
def test_contradictory_flags_are_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    argv = (
        [*argv, "--out", str(tmp_path / "run")]
        if argv[0] == "train"
        else [a.replace("RUN", str(tmp_path)) for a in argv]
    )
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()


def test_the_train_flags_reach_the_config(tmp_path: Path) -> None:
    argv = ["train", "--out", str(tmp_path / "x"), "--protocol", "authors", "--binarization", "threshold",
            "--train-split", "train+valid", "--latent-dims", "100,50,20", "--init-from", "base",
            "--fresh-optimizer"]  # fmt: skip
    config = _train_config(build_parser().parse_args(argv))
    assert (config.optimizer, config.data_order, config.loss_reduction, config.beta1) == (
        "burda-adam",
        "fixed",
        "sum",
        0.99,
    )
    assert (config.binarization, config.train_split, config.fresh_optimizer) == ("threshold", "train+valid", True)
    assert config.model.latent_dims == (100, 50, 20)


@pytest.mark.usefixtures("one_thread")
def test_cli_train_with_estimator_and_objective_parameters(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    code = main([
        "train", "--objective", "piwae", "--M", "2", "--k", "4", "--estimator", "dreg", "--epochs", "1",
        "--train-limit", "20", "--out", str(run), "--no-progress", "--device", "cpu", "--latent-dims", "3",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["complete"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["objective"] == {"name": "piwae", "M": 2} and saved["estimator"] == "dreg"
    code = main(["train", "--objective", "ciwae", "--k", "4", "--out", str(tmp_path / "bad"), "--no-progress"])
    assert code == 2 and "needs beta (--beta)" in capsys.readouterr().err


def test_cli_trains_seeds_together_with_a_line_per_seed_each_its_single_run_bit_for_bit(tmp_path: Path, capsys) -> None:
    """On a CPU the seeds share one loop, each model taking its own fast step in turn: every seed ends where its
    single run ends, bit for bit."""
    argv = ["train", "--objective", "iwae", "--k", "2", "--epochs", "1", "--train-limit", "60", "--latent-dims", "4",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main([*argv, "--seeds", "3,5", "--out", str(tmp_path / "seeds")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["seed"] for line in lines] == [3, 5]
    assert lines[0]["seconds"] == lines[1]["seconds"] and lines[0]["gradients"].endswith("2 models, one after another")
    assert main([*argv, "--seed", "5", "--out", str(tmp_path / "single")]) == 0
    single, together = runs.load_model(tmp_path / "single")[0], runs.load_model(tmp_path / "seeds" / "seed-5")[0]
    pairs = zip(single.state_dict().values(), together.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    for seed in (3, 5):
        assert runs.load_config(tmp_path / "seeds" / f"seed-{seed}").seed == seed
        assert (tmp_path / "seeds" / f"seed-{seed}" / runs.MODEL_FILE).is_file()
    assert main(["train", "--seeds", "1,1", "--out", str(tmp_path / "x")]) == 2  # repeated seeds: a usage error
    assert main(["train", "--seeds", "1", "--seed", "2", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
