"""The ``iwae`` command (iwae.cli): one registration style, the commands ``iwae --help`` lists, and a parser that
needs no torch."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest
from parsers import subparsers

import iwae.cli
from iwae.cli import COMMAND_MODULES, build_parser, main

COMMANDS = ("train", "eval", "sample", "snr", "sweep", "reproduce", "results", "report", "posterior", "camel",
            "anomaly", "impute", "bench", "gpu-check")  # fmt: skip


NOT_COMMANDS = {"common"}  # modules of iwae.cli that hold shared argparse helpers, not commands


def test_every_command_module_registers_its_commands_the_one_way() -> None:
    modules = {info.name for info in pkgutil.iter_modules(iwae.cli.__path__)} - NOT_COMMANDS
    assert {m.__name__.rsplit(".", 1)[1] for m in COMMAND_MODULES} == modules
    for module in COMMAND_MODULES:
        assert callable(getattr(module, "register", None)), module.__name__
    assert not hasattr(iwae.cli, "COMMANDS")
    for name, sub in subparsers(build_parser()).items():
        assert callable(sub.get_default("handler")), name


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert tuple(subparsers(build_parser())) == COMMANDS
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line[4:5].strip()}
    assert listed == set(COMMANDS)


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
