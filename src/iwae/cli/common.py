"""Sub-commands of ``iwae`` beyond train/eval/sample, one module each (see ``iwae.cli``),
and the argument types they share."""

from __future__ import annotations

import argparse


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


def add_run_options(parser: argparse.ArgumentParser, *, json_flag: bool = False, data: bool = True) -> None:
    """The options most commands share: ``--device``/``--data-dir`` (unless ``data=False``), ``--no-progress``
    and, for commands that print a result object, ``--json``."""
    if json_flag:
        parser.add_argument("--json", action="store_true", help="no table on stderr; stdout carries the JSON object")
    if data:
        parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
        parser.add_argument("--data-dir", default=None, help="directory holding dataset files (else $IWAE_DATA_DIR)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
