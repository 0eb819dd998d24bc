"""What the ``iwae`` subcommands share at the argparse level: the usage error, argument types, the common
options, the options of the training settings (:mod:`iwae.settings`), and deprecated flag spellings.

Nothing here imports torch: ``iwae --help`` and usage errors build every subcommand's parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from iwae.files import check_name_lengths
from iwae.names import DEVICE_PATTERN
from iwae.names import MAX_SEED as MAX_SEED  # tests/cli/test_common.py compares it with iwae.config's
from iwae.settings import Setting

# The argument types of numbers, lists and seeds live with the settings that use them (iwae.settings, torch-free);
# the command modules import them from here.
from iwae.settings import fraction as fraction
from iwae.settings import non_negative_float as non_negative_float
from iwae.settings import non_negative_int as non_negative_int
from iwae.settings import positive_float as positive_float
from iwae.settings import positive_int as positive_int
from iwae.settings import positive_int_list as positive_int_list
from iwae.settings import schedule as schedule
from iwae.settings import seed as seed
from iwae.settings import seed_list as seed_list


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def device(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether the machine has it is checked
    later, with torch)."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
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
    try:
        check_name_lengths(target, flag)
    except ValueError as error:
        raise UsageError(f"{command}: {error}") from None
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


def add_setting(
    parser: argparse.ArgumentParser, setting: Setting, groups: dict[str, Any]
) -> argparse.Action:
    """Add the option of a training setting (:class:`iwae.settings.Setting`) to ``parser``: ``setting.option``
    into ``dest = setting.name``, read by its kind's argparse type, with its choices, metavar and help. Its
    default is ``None`` whatever the setting's default: a setting left out is left to
    :func:`iwae.config.build_train_config`, which knows the defaults (and which of them depend on other settings).
    A setting with a ``group`` joins that mutually exclusive group of ``groups``, created on first use."""
    target: Any = parser
    if setting.group is not None:
        if setting.group not in groups:
            groups[setting.group] = parser.add_mutually_exclusive_group()
        target = groups[setting.group]
    help_text = setting.help_text().replace("%", "%%")  # argparse expands %(...)s in help
    if setting.kind.parse is None:  # a switch
        return target.add_argument(setting.option, dest=setting.name, action="store_true", default=None,
                                   help=help_text)  # fmt: skip
    return target.add_argument(
        setting.option,
        dest=setting.name,
        type=setting.kind.parse,
        choices=setting.choices,
        metavar=setting.metavar,
        default=None,
        help=help_text,
    )


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
    returned): same destination and type, left out of ``--help``, one warning line on stderr when used
    (docs/cli.md says which old spellings are accepted)."""
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
