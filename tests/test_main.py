"""``python -m iwae`` (iwae/__main__.py): the command line's entry point."""

from __future__ import annotations

import subprocess
import sys


def test_console_entry_point() -> None:
    completed = subprocess.run([sys.executable, "-m", "iwae", "--version"], capture_output=True, text=True, check=True)
    assert completed.stdout.startswith("iwae ")
