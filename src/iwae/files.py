"""Files and folders the package creates, appends to or locks, opened without following a symbolic link.

A path the package derives for itself (a run's ``metrics.jsonl`` and ``.lock``, a sweep's ``.sweep.lock`` and
``runs/``, ``OUT/seed-S``, a report's ``_files`` folder, ``RUN/snr``) must never let a planted link turn the write
against another file: every such open uses ``O_NOFOLLOW`` at the last component, and a derived folder that is a
link is refused. A folder the user names (``--out``) may itself be a link to a folder; the names inside it may not.
Whole-file writes go through :func:`iwae.checkpoint.atomic_write_bytes`, which replaces a link instead of following
it.

Each refusal is a :class:`LinkRefused` (a :class:`ValueError`, so the command line answers it with one line and
exit code 2) raised before anything is written.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


class LinkRefused(ValueError):
    """A path the package would create or write through is a symbolic link (or a loop of them); nothing was
    written. The message is one line naming the path and what to do."""


def refusal(path: str | os.PathLike[str], what: str = "") -> LinkRefused:
    """The :class:`LinkRefused` of ``path``, naming ``what`` it is (a lock, a run's metrics, ...)."""
    named = f"{what} {path}" if what else str(path)
    return LinkRefused(
        f"{named} is a symbolic link, which this package never writes through; remove the link and rerun"
    )


def _open(path: Path, flags: int, what: str) -> int:
    try:
        handle = os.open(path, flags | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP or os.path.islink(path):  # ELOOP: O_NOFOLLOW met a link
            raise refusal(path, what) from None
        raise
    if os.fstat(handle).st_nlink > 1:  # a hard link: writing here would write the other name's file too
        os.close(handle)
        named = f"{what} {path}" if what else str(path)
        raise LinkRefused(f"{named} has other hard links, which this package never writes through; copy it and rerun")
    return handle


def open_append(path: str | os.PathLike[str], what: str = "") -> int:
    """A file descriptor appending to ``path`` (created if missing, mode 0o644 less the umask).

    Raises:
        LinkRefused: ``path`` is a symbolic link (dangling or not).
    """
    return _open(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, what)


def open_lock(path: str | os.PathLike[str], what: str = "") -> int:
    """A read-write file descriptor on the lock file ``path`` (created if missing; never truncated here).

    Raises:
        LinkRefused: ``path`` is a symbolic link.
    """
    return _open(Path(path), os.O_RDWR | os.O_CREAT, what)


def append_text(path: str | os.PathLike[str], text: str, what: str = "") -> None:
    """Append ``text`` (UTF-8) to ``path`` in one ``write``, without following a link at ``path``."""
    handle = open_append(path, what)
    try:
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(handle, data) :]
    finally:
        os.close(handle)


def make_folder(path: str | os.PathLike[str], what: str = "") -> Path:
    """Create the folder ``path`` that the package derives (and its missing parents); an existing folder is kept.

    Raises:
        LinkRefused: ``path`` is a symbolic link, even to a folder.
        FileExistsError: ``path`` is a file.
    """
    path = Path(path)
    if path.is_symlink():
        raise refusal(path, what)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_derived(path: str | os.PathLike[str], what: str = "") -> None:
    """Refuse (reading only) a derived file or folder ``path`` that is a symbolic link.

    Raises:
        LinkRefused: it is one.
    """
    if os.path.islink(path):
        raise refusal(path, what)


def resolved(path: str | os.PathLike[str], flag: str = "") -> Path:
    """``path`` made absolute with its links resolved, where a loop of links is a one-line :class:`LinkRefused`
    (``Path.resolve`` raises a ``RuntimeError`` there on Python 3.11 and 3.12, and returns the path on 3.13, where
    ``os.stat``'s ``ELOOP`` tells)."""
    named = f"{flag} {path}" if flag else str(path)
    loop = LinkRefused(f"{named} is a loop of symbolic links; point it at a real folder")
    try:
        found = Path(path).resolve()
    except (RuntimeError, OSError):
        raise loop from None
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise loop from None
    return found


def check_name_lengths(path: str | os.PathLike[str], flag: str = "", extra: int = 0) -> None:
    """Refuse a path one of whose names is longer than the file system allows (:data:`NAME_MAX` bytes), before
    anything is created; ``extra``: the bytes the package may add to its last name (a temporary's suffix, say).

    Raises:
        ValueError: one line naming the name and its length.
    """
    parts = Path(path).parts
    for index, name in enumerate(parts):
        size = len(os.fsencode(name)) + (extra if index == len(parts) - 1 else 0)
        if size > NAME_MAX:
            named = f"{flag} {path}" if flag else str(path)
            raise ValueError(
                f"{named}: the name {name[:40]!r}... is {len(os.fsencode(name))} bytes, longer than a file name "
                f"may be ({NAME_MAX - extra} here); choose a shorter one"
            )
