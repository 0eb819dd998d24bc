"""The private build cache of :mod:`iwae.fast`'s compiled libraries (:func:`iwae.fast.native.build_and_load`).

A library that a process loads runs as that process's user, so the cache holds only what this user built:

- the cache directory, and every parent the package creates, is made with mode ``0o700``; an existing one is used
  only if it is a directory (not a symbolic link), owned by this user and writable by no one else
  (:func:`directory_problem`). Otherwise the build goes to a fresh private temporary directory, with one warning line
  on stderr, and the fast path's status says why;
- after a build, the library's SHA-256 is recorded next to it (``NAME.so.sha256``, in ``sha256sum``'s format, written
  to an exclusively created temporary file in the same directory and renamed); a cached library is loaded only if it
  and its record are regular files (not links) owned by this user and writable by no one else, and the library's
  SHA-256 equals the recorded one (:func:`library_problem`). Otherwise it is rebuilt, and a rebuild that fails these
  checks is not loaded.

Builds in one directory take turns (:func:`locked`): a second process waits for the first's build and reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Unix: builds do not take turns
    fcntl = None

PRIVATE_MODE = 0o700
DIGEST_SUFFIX = ".sha256"
MISSING = "missing"
_warned: set[str] = set()


def _ownership_problem(info: os.stat_result) -> str | None:
    """Why a file or directory with this ``lstat`` is not this user's alone, or None."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    if uid is not None and info.st_uid != uid:
        return f"owned by uid {info.st_uid}, not by this user (uid {uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by its group or others (mode {stat.S_IMODE(info.st_mode):#o})"
    return None


def _problem(path: Path, is_kind: Callable[[int], bool], kind: str) -> str | None:
    """Why ``path`` (not followed if a link) is not a ``kind`` of this user's alone, or None."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return MISSING
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link"
    if not is_kind(info.st_mode):
        return f"not a {kind}"
    return _ownership_problem(info)


def directory_problem(path: Path) -> str | None:
    """Why ``path`` cannot serve as a private build directory (:data:`MISSING` if it does not exist), or None."""
    return _problem(path, stat.S_ISDIR, "directory")


def make_private_directory(path: Path) -> str | None:
    """Create ``path`` and its missing parents with mode ``0o700``; return why it cannot serve as a private build
    directory (:func:`directory_problem`), or None."""
    missing = []
    ancestor = Path(path)
    while not os.path.lexists(ancestor) and ancestor.parent != ancestor:
        missing.append(ancestor)
        ancestor = ancestor.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_MODE)
        except FileExistsError:
            pass  # made by another process meanwhile: checked below
        except OSError as error:
            return f"not creatable ({error.strerror or error})"
    return directory_problem(path)


def file_problem(path: Path) -> str | None:
    """Why ``path`` is not a regular file of this user's alone (:data:`MISSING` if it does not exist), or None."""
    return _problem(path, stat.S_ISREG, "regular file")


def digest_path(library: Path) -> Path:
    """Where ``library``'s SHA-256 is recorded: ``NAME.so.sha256`` next to it."""
    return library.with_name(library.name + DIGEST_SUFFIX)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def record_digest(library: Path) -> None:
    """Record ``library``'s SHA-256 next to it, atomically: an exclusively created temporary file in the same
    directory, renamed over the record."""
    line = f"{file_sha256(library)}  {library.name}\n"  # sha256sum's format: `sha256sum -c` checks it
    handle, temporary = tempfile.mkstemp(prefix=f".{library.name}.", suffix=DIGEST_SUFFIX, dir=library.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(line)
        os.replace(temporary, digest_path(library))
    finally:
        Path(temporary).unlink(missing_ok=True)


def _recorded_digest(library: Path) -> str | None:
    try:
        fields = digest_path(library).read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    return fields[0].lower() if fields and len(fields[0]) == 64 else None


def library_problem(library: Path) -> str | None:
    """Why the library at ``library`` must not be loaded, or None: it and its SHA-256 record must be regular files
    owned by this user and writable by no one else, and its SHA-256 must equal the recorded one."""
    problem = file_problem(library)
    if problem is not None:
        return f"{library.name} is {problem}"
    record = digest_path(library)
    problem = file_problem(record)
    if problem == MISSING:
        return f"{library.name} has no recorded SHA-256 ({record.name})"
    if problem is not None:
        return f"{library.name}'s SHA-256 record {record.name} is {problem}"
    recorded = _recorded_digest(library)
    if recorded is None:
        return f"{library.name}'s SHA-256 record {record.name} is malformed"
    try:
        actual = file_sha256(library)
    except OSError as error:
        return f"{library.name} is unreadable ({error.strerror or error})"
    if actual != recorded:
        return f"{library.name}'s SHA-256 differs from the one recorded after its build"
    return None


def remove(library: Path) -> None:
    """Delete a library and its SHA-256 record (a link is deleted, not what it points to)."""
    library.unlink(missing_ok=True)
    digest_path(library).unlink(missing_ok=True)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (``flock`` on the directory itself, no lock file) while checking,
    building and loading; where locks are unavailable, go on without one."""
    if fcntl is None:
        yield
        return
    try:
        handle = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def warn_once(message: str) -> None:
    """One warning line on stderr, once per process for each message."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)
