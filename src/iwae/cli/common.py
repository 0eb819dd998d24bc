"""What the ``iwae`` subcommands share at the argparse level: the usage error, argument types, the common
options, choices read lazily from a registry, and deprecated flag spellings.

Nothing here imports torch: ``iwae --help`` and usage errors build every subcommand's parser.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iwae.names import DEVICE_PATTERN, MAX_SEED


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def _whole_number(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected a number >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return _whole_number(text, 0)


def _comma_separated(text: str, expected: str) -> list[int]:
    """Whole numbers separated by commas (empty items skipped); else ``expected`` in the argparse error."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int_list(text: str) -> list[int]:
    """argparse type: comma-separated whole numbers >= 1, in the order given."""
    values = _comma_separated(text, "comma-separated whole numbers")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1, got {text!r}")
    return values


def seed(text: str) -> int:
    """argparse type: a seed, a whole number 0..:data:`iwae.names.MAX_SEED`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number 0..{MAX_SEED}, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed 0..{MAX_SEED}, got {text}")
    return value


def seed_list(text: str) -> list[int]:
    """argparse type: distinct comma-separated seeds (0..:data:`iwae.names.MAX_SEED`), in the order given."""
    values = _comma_separated(text, "comma-separated whole numbers such as 0,1,2")
    if not values or len(set(values)) != len(values) or not 0 <= min(values) <= max(values) <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected distinct seeds 0..{MAX_SEED}, got {text!r}")
    return values


def _number(text: str, accept: Callable[[float], bool], expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    return _number(text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def device(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether the machine has it is checked
    later, with torch)."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def schedule(text: str) -> str:
    """argparse type: ``burda`` or ``burda:S``, S a whole number (the range is checked with the configuration)."""
    name, colon, count = text.partition(":")
    if name != "burda" or (colon and not count.isdecimal()):
        raise argparse.ArgumentTypeError(f"expected 'burda' or 'burda:S' with S = 1..8 stages, got {text!r}")
    return text


def existing_dir(text: str) -> str:
    """argparse type: a folder that exists."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder {text!r}")
    return text


def writable_location(path: str | Path, flag: str, command: str, *, folder: bool = True) -> None:
    """Raise :class:`UsageError` (its message starting with ``command``) unless ``path``, the value of ``flag`` (a
    folder, or with ``folder=False`` a file), exists as that or can be created: its nearest existing ancestor must be
    a writable folder. Checked before anything is created."""
    target = Path(path)
    if target.exists() and target.is_dir() != folder:
        kind = "a file, not a folder" if folder else "a folder, not a file"
        raise UsageError(f"{command}: {flag} {path} is {kind}; choose another {flag}")
    ancestor = next((p for p in ((target, *target.parents) if folder else target.parents) if p.exists()), None)
    if ancestor is None or not ancestor.is_dir():
        raise UsageError(f"{command}: {flag} {path}: {ancestor} is a file, so nothing can be made under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{command}: {flag} {path}: {ancestor.resolve()} is not writable; choose another {flag}")


def add_run_options(parser: argparse.ArgumentParser, *, json_flag: bool = False, data: bool = True) -> None:
    """The options most commands share: ``--device``/``--data-dir`` (unless ``data=False``), ``--no-progress``
    and, for commands that print a result object, ``--json``."""
    if json_flag:
        parser.add_argument("--json", action="store_true", help="no table on stderr; stdout carries the JSON object")
    if data:
        parser.add_argument("--device", type=device, default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
        parser.add_argument("--data-dir", type=existing_dir, default=None,
                            help="directory holding dataset files (else $IWAE_DATA_DIR)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


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
