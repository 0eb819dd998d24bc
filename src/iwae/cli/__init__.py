"""The ``iwae`` command line: ``iwae train``, ``iwae eval``, ``iwae sample`` and the commands of the lab.

Only this package reads ``sys.argv``. Each command lives in a module of ``iwae.cli`` listed in
:data:`COMMAND_MODULES`; the module's ``register(subparsers)`` adds its parsers, each with
``set_defaults(handler=fn)``, where ``fn`` takes the parsed arguments and returns the JSON-serialisable result
to print. Bad arguments and missing files end with a one-line error on stderr and exit code 2; results go to
stdout as one JSON object. A file that cannot be written (:class:`iwae.checkpoint.WriteError`: a full disk, a quota,
a read-only folder) ends with a one-line error and exit code 1, not 2: the command was right and the previous file is
intact, so the same command succeeds once space is freed; 2 stays the sign of arguments or inputs to change.

Building the parser imports no torch (the command modules defer it to their handlers), so ``iwae --help`` and
usage errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from iwae import __version__
from iwae.cli import analyses, bench, run, snr, sweep
from iwae.cli.common import UsageError
from iwae.cli.run import _train_config as _train_config  # tests/test_experiments.py imports it from here

__all__ = ["COMMAND_MODULES", "UsageError", "build_parser", "main"]

EXIT_USAGE = 2
EXIT_WRITE = 1  # a file could not be written (see the module's docstring)
COMMAND_MODULES = (run, snr, sweep, analyses, bench)  # in the order of ``iwae --help``


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
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
    try:
        args = _parse(argv)
    except UsageError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    # Deferred on purpose: iwae.data and iwae.runs import torch (seconds), which --help and usage errors skip.
    from iwae.checkpoint import WriteError
    from iwae.data import DataError
    from iwae.runs import RunError

    try:
        payload = args.handler(args)
    except UsageError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    except WriteError as error:  # its message is one line: the path, the reason, what to do
        print(f"error: {error}", file=sys.stderr)
        return EXIT_WRITE
    except (DataError, RunError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; continue with the same command and --resume", file=sys.stderr)
        return 130
    for item in payload if isinstance(payload, list) else [payload]:  # a list: one JSON line per item
        print(json.dumps(item))
    return 0
