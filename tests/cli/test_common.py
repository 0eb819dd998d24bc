"""iwae.cli.common: old flag spellings that still work, warn and stay out of the help, and the command line's
early checks, which must agree with the library's."""

from __future__ import annotations

import pytest
from parsers import subparsers

from iwae import config as config_module
from iwae import runs
from iwae.cli import build_parser, common


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
    parsers = subparsers(build_parser())
    for name, parser in parsers.items():
        for flag in ("--K", "--L"):
            assert flag not in parser.format_help().split(), (name, flag)
    assert "--impute-k" in parsers["impute"].format_help()


def test_the_command_lines_early_checks_agree_with_the_librarys() -> None:
    assert common.MAX_SEED == config_module.MAX_SEED
    assert common.DEVICE_PATTERN.pattern == runs.DEVICE_PATTERN.pattern
