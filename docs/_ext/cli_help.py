"""Refresh the help texts in ``docs/cli.md`` from the command line itself.

Each ```` ```text ```` block of ``docs/cli.md`` that starts with ``usage: iwae`` is ``iwae [COMMAND] --help`` as
this checkout prints it at 100 columns (see contributing.md). ``iwae train``'s options are generated from the
training settings' table (:mod:`iwae.settings`), so a setting added or changed there shows here after::

    .venv/bin/python docs/_ext/cli_help.py            # rewrite the blocks that differ
    .venv/bin/python docs/_ext/cli_help.py --check    # change nothing; exit 1 naming the blocks that differ

Only the help blocks are touched; the prose around them is left as it is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

CLI_MD = Path(__file__).resolve().parents[1] / "cli.md"
BLOCK = re.compile(r"(```text\n)(usage: iwae(?: ([a-z][a-z-]*))?.*?)(```)", re.DOTALL)
COLUMNS = "100"


def help_text(command: str | None) -> str:
    """``iwae [command] --help`` at :data:`COLUMNS` columns."""
    argv = [sys.executable, "-m", "iwae", *([command] if command else []), "--help"]
    env = {**os.environ, "COLUMNS": COLUMNS}
    return subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout


def refresh(text: str) -> tuple[str, list[str]]:
    """``text`` (``docs/cli.md``) with every help block as the command prints it, and the blocks that changed."""
    changed: list[str] = []

    def replace(match: re.Match[str]) -> str:
        command = match.group(3)
        fresh = help_text(command)
        if fresh != match.group(2):
            changed.append(f"iwae {command}" if command else "iwae")
        return match.group(1) + fresh + match.group(4)

    return BLOCK.sub(replace, text), changed


def main(argv: list[str]) -> int:
    text = CLI_MD.read_text()
    fresh, changed = refresh(text)
    if "--check" in argv:
        if changed:
            print(f"{CLI_MD}: the help of {', '.join(changed)} differs; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    if changed:
        CLI_MD.write_text(fresh)
        print(f"{CLI_MD}: refreshed {', '.join(changed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
