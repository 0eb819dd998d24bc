"""The command line's shape: one registration style, the commands ``iwae --help`` lists, the choices read from the
registries, ``--k`` as the one name for samples per example (old spellings warn), and a parser that needs no torch."""

from __future__ import annotations

import argparse
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import iwae.cli
from iwae.cli import COMMAND_MODULES, build_parser, main

COMMANDS = ("train", "eval", "sample", "snr", "sweep", "reproduce", "results", "report", "posterior", "camel",
            "anomaly", "impute", "bench", "gpu-check")  # fmt: skip
NOT_COMMANDS = {"common"}  # modules of iwae.cli that hold shared argparse helpers, not commands


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return action


def test_every_command_module_registers_its_commands_the_one_way() -> None:
    modules = {info.name for info in pkgutil.iter_modules(iwae.cli.__path__)} - NOT_COMMANDS
    assert {m.__name__.rsplit(".", 1)[1] for m in COMMAND_MODULES} == modules
    for module in COMMAND_MODULES:
        assert callable(getattr(module, "register", None)), module.__name__
    assert not hasattr(iwae.cli, "COMMANDS")
    for name, sub in _subparsers(build_parser()).items():
        assert callable(sub.get_default("handler")), name


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert tuple(_subparsers(build_parser())) == COMMANDS
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line[4:5].strip()}
    assert listed == set(COMMANDS)


def test_train_choices_come_from_the_registries() -> None:
    from iwae.data import DATASETS
    from iwae.estimators import ESTIMATOR_NAMES
    from iwae.objectives import objective_names

    train = _subparsers(build_parser())["train"]
    assert tuple(_option(train, "--objective").choices) == tuple(objective_names())
    assert tuple(_option(train, "--estimator").choices) == tuple(ESTIMATOR_NAMES)
    assert tuple(_option(train, "--dataset").choices) == tuple(DATASETS)
    text = train.format_help()
    assert all(name in text for name in objective_names())
    from iwae import names  # the torch-free copies the parser uses are the registries' names

    assert (tuple(DATASETS), tuple(objective_names()), tuple(ESTIMATOR_NAMES)) == (
        names.DATASET_NAMES,
        names.OBJECTIVE_NAMES,
        names.ESTIMATOR_NAMES,
    )


def test_snr_help_names_the_studys_default_ks() -> None:
    from iwae.studies.snr import DEFAULT_KS

    snr = _subparsers(build_parser())["snr"]
    assert ",".join(map(str, DEFAULT_KS)) in " ".join(snr.format_help().split())


@pytest.mark.parametrize(
    ("argv", "expected", "old"),
    [
        (["anomaly", "RUN", "--L", "7"], {"k": 7}, ["--L"]),
        (["impute", "--K", "3"], {"k": 3, "impute_k": 1000}, ["--K"]),
        (["impute", "--L", "9"], {"k": 20, "impute_k": 9}, ["--L"]),
        (["impute", "--K", "3", "--L", "9"], {"k": 3, "impute_k": 9}, ["--K", "--L"]),
    ],
)
def test_old_sample_flags_still_work_and_warn(capsys, argv: list[str], expected: dict, old: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert {name: getattr(args, name) for name in expected} == expected
    err = capsys.readouterr().err
    new = {"--K": "--k", "--L": "--k" if argv[0] == "anomaly" else "--impute-k"}
    assert err.splitlines() == [f"warning: {flag} is deprecated; use {new[flag]}" for flag in old]
    renamed = [new.get(a, a) for a in argv]
    assert vars(build_parser().parse_args(renamed)) == vars(args)
    assert capsys.readouterr().err == ""


def test_old_sample_flags_are_hidden_from_help() -> None:
    parsers = _subparsers(build_parser())
    for name, parser in parsers.items():
        for flag in ("--K", "--L"):
            assert flag not in parser.format_help().split(), (name, flag)
    assert "--impute-k" in parsers["impute"].format_help()


def test_old_flags_reach_the_studies(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from iwae.studies import anomaly, impute

    seen = {}
    monkeypatch.setattr(anomaly, "anomaly_run", lambda run, **kw: seen.update(anomaly=kw) or {"L": kw["n_samples"]})
    monkeypatch.setattr(impute, "impute_run", lambda dataset, settings, out, **kw: seen.update(impute=settings) or {})
    assert main(["anomaly", str(tmp_path), "--L", "4", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out) == {"L": 4}
    assert main(["impute", "--K", "5", "--L", "6", "--out", str(tmp_path), "--json", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: --K is deprecated; use --k" in err and "warning: --L is deprecated; use --impute-k" in err
    assert seen["anomaly"]["n_samples"] == 4
    assert (seen["impute"].k, seen["impute"].n_impute) == (5, 6)


def test_help_and_usage_errors_import_no_torch() -> None:
    script = (
        "import sys, contextlib, io\n"
        "from iwae.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert main(['train', '--k', '0', '--out', 'x']) == 2\n"
        "assert main(['eval', '/nonexistent/run']) == 2\n"
        "assert main(['impute', '--K', '0']) == 2\n"
        "assert main(['train', '--objective', 'nope', '--out', 'x']) == 2\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['train', '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules, 'building the parser imported torch'\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_train_arguments_go_through_the_one_config_builder(tmp_path: Path) -> None:
    from iwae.cli.run import _train_config

    argv = ["train", "--out", str(tmp_path / "x"), "--init-from", "some/run", "--epochs", "1", "--k", "3"]
    config = _train_config(build_parser().parse_args(argv))
    assert config.init_from == str(Path("some/run").resolve()) and config.k == 3
    assert _train_config(build_parser().parse_args(["train", "--out", "x", "--epochs", "1"])).init_from is None
