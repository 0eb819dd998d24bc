"""The ``iwae`` command line: ``iwae train``, ``iwae eval``, ``iwae sample`` and the commands of the lab.

Only this package reads ``sys.argv``. Each command lives in a module of ``iwae.cli`` listed in
:data:`COMMAND_MODULES`; the module's ``register(subparsers)`` adds its parsers, each with
``set_defaults(handler=fn)``, where ``fn`` takes the parsed arguments and returns the JSON-serialisable result
to print. Results go to stdout as one JSON object, strictly JSON: a non-finite number (NaN, an infinity) is
written as null. Failures end with one line on stderr:

- exit code 2: bad arguments or inputs (flags, configuration files, damaged checkpoints), nothing changed on
  disk; also a run that diverges (:class:`iwae.runs.DivergenceError`), its last finite checkpoint kept. 2 is the
  sign of arguments or inputs to change;
- exit code 1: a file that cannot be written (:class:`iwae.checkpoint.WriteError`: a full disk, a quota, a
  read-only folder). The command was right and the previous file is intact, so the same command succeeds once
  space is freed.

Building the parser imports no torch (the command modules defer it to their handlers), so ``iwae --help`` and
usage errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iwae import __version__
from iwae.cli import analyses, bench, run, snr, sweep
from iwae.cli.common import UsageError

__all__ = ["COMMAND_MODULES", "UsageError", "build_parser", "main"]

EXIT_USAGE = 2
EXIT_WRITE = 1  # a file could not be written (see the module's docstring)
COMMAND_MODULES = (run, snr, sweep, analyses, bench)  # in the order of ``iwae --help``


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The ``iwae`` parser with every command of :data:`COMMAND_MODULES` (imports no torch)."""
    parser = _Parser(prog="iwae", description="Importance-weighted variational inference (VAE, IWAE).")
    parser.add_argument("--version", action="version", version=f"iwae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if getattr(args, "run", None) is not None and not Path(args.run).is_dir():
        raise UsageError(f"iwae {args.command}: no run directory {args.run!r}; train one with 'iwae train'")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (``sys.argv[1:]`` if None), print its JSON result; returns the exit code."""
    try:
        args = _parse(argv)
    except UsageError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    try:
        payload = args.handler(args)
    except UsageError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; continue with the same command and --resume", file=sys.stderr)
        return 130
    except Exception as error:
        code = _exit_code(error)
        if code is None:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return code
    for item in payload if isinstance(payload, list) else [payload]:  # a list: one JSON line per item
        print(json.dumps(finite_json(item), allow_nan=False))
    return 0


def _exit_code(error: Exception) -> int | None:
    """The exit code of an error the handlers report in one line (None: a bug, raised with its traceback)."""
    # Deferred on purpose: iwae.data and iwae.runs import torch (seconds), which --help and usage errors skip.
    from iwae.checkpoint import WriteError
    from iwae.data import DataError
    from iwae.runs import RunError

    if isinstance(error, WriteError):  # its message is one line: the path, the reason, what to do
        return EXIT_WRITE
    if isinstance(error, DataError | RunError | OSError | ValueError):  # OSError: an unreadable input, say
        return EXIT_USAGE
    return None


def _one_line(error: Exception) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, an infinity) replaced by None, which JSON writes as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value
