"""What the ``iwae`` subcommands share at the argparse level: the usage error, argument types, the common
options, choices read lazily from a registry, and deprecated flag spellings.

Nothing here imports torch: ``iwae --help`` and usage errors build every subcommand's parser.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """argparse type: comma-separated whole numbers >= 1, in the order given."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1, got {text!r}")
    return values


def seed_list(text: str) -> list[int]:
    """argparse type: distinct comma-separated whole numbers (seeds), in the order given."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers such as 0,1,2, got {text!r}"
        ) from None
    if not values or len(set(values)) != len(values) or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return values


def add_run_options(parser: argparse.ArgumentParser, *, json_flag: bool = False, data: bool = True) -> None:
    """The options most commands share: ``--device``/``--data-dir`` (unless ``data=False``), ``--no-progress``
    and, for commands that print a result object, ``--json``."""
    if json_flag:
        parser.add_argument("--json", action="store_true", help="no table on stderr; stdout carries the JSON object")
    if data:
        parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
        parser.add_argument("--data-dir", default=None, help="directory holding dataset files (else $IWAE_DATA_DIR)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


class LazyChoices(Sequence[str]):
    """argparse ``choices`` read from a registry the first time they are needed.

    The registries (objectives, estimators, datasets) live in modules that import torch, which takes seconds;
    argparse reads ``choices`` only to check a value given for that option or to print that command's help.
    Give the option a ``metavar`` (else argparse lists the choices as soon as the option is added) and name them
    in its help with ``%(choices)s``."""

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load

    @functools.cached_property
    def _values(self) -> tuple[str, ...]:
        return tuple(self._load())

    def __getitem__(self, index):
        return self._values[index]

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"LazyChoices({list(self._values)!r})"


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new option's ``dest`` and warns once per use."""

    def __init__(self, option_strings, dest, *, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: argparse.Action) -> None:
    """Accept ``old`` as a hidden, deprecated spelling of the option ``new`` (the action ``add_argument``
    returned): same destination and type, left out of ``--help``, one warning line on stderr when used.
    Kept for one release after a rename."""
    parser.add_argument(
        old,
        action=_DeprecatedAlias,
        new=new.option_strings[0],
        dest=new.dest,
        type=new.type,
        nargs=new.nargs,
        default=argparse.SUPPRESS,  # the new option's default stands
        help=argparse.SUPPRESS,
    )
