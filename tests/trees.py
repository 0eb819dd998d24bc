"""What the bad-input suites check of a refused command: one line on stderr, exit code 2, nothing on stdout, and a
folder's tree unchanged (:func:`snapshot` before and after)."""

from __future__ import annotations

import os
from pathlib import Path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` (links not followed) with its size and mtime (ns)."""
    tree = {}
    for parent, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            stat = os.lstat(Path(parent) / name)
            tree[str((Path(parent) / name).relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return tree


def assert_refused(code: int, out: str, err: str, expect: str) -> None:
    """A refusal: exit code 2, one stderr line holding ``expect``, no traceback, nothing on stdout."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expect in lines[0], lines[0]
    assert out == ""
