"""The parts of the ``iwae`` command's argparse parser that the command-line tests (``tests/cli/``) look into."""

from __future__ import annotations

import argparse


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each command's parser, by name, in the order ``iwae --help`` lists them."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    """The action of ``flag`` in ``parser``."""
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return action
