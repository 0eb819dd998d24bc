"""Advisory locks: a sweep owns its folder (``DIR/.sweep.lock``), a writer the run it trains (``RUN/.lock``).

A lock is ``fcntl.flock`` on an open file, so the kernel drops it when its holder ends, however it ends
(``kill -9`` included): a lock never outlives its process and there is nothing stale to clean up. The holder writes
its pid, host and start time into the file, for the one-line message of a process that is refused; the text stays
after release, and only the flock says whether the file is held. The locks keep this package's own processes apart
and nothing else.

On a network file system flock holds across machines where the client maps it to POSIX locks (Linux NFS does;
Lustre when mounted with ``flock``). Where there is no ``fcntl`` (Windows), ``msvcrt.locking`` locks one byte far
past the holder's text instead.

A lock that a thread already holds is held again by the same thread at no cost (a sweep's worker holds its run's
lock and then trains it through :func:`iwae.train.fit_runs`, which takes the same lock); another thread, or another
process, is refused; a block must end on the thread that entered it (every caller's does: ``with`` blocks and
exit stacks unwound where they were built). The lock file is opened without following a symbolic link, or a
hard link (:func:`iwae.files.open_lock`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from iwae.files import open_lock

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

FAR_BYTE = 2**30  # the byte msvcrt.locking locks (Windows), beyond any holder text
POLL_S = 0.5
_held = threading.local()  # per thread: (st_dev, st_ino) of each lock file it holds -> how often


class LockBusy(ValueError):
    """Another process holds the lock; the message names it (pid, host, since when)."""


def _try_lock(fd: int, block: bool) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True
    import msvcrt  # Windows only

    os.lseek(fd, FAR_BYTE, os.SEEK_SET)
    while True:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            if not block:
                return False
            time.sleep(POLL_S)


def holder(path: str | Path) -> str:
    """Who holds (or last held) the lock at ``path``: 'pid P on host H since T', from the text its holder wrote."""
    try:
        info = json.loads(Path(path).read_text())
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def hold(
    path: str | Path,
    *,
    what: str,
    hint: str = "",
    wait: bool = False,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the lock ``path`` (created if missing) for the block.

    Args:
        path: the lock file.
        what: what the lock guards, as the refusal names it.
        hint: what to do, appended to the refusal.
        wait: block until the lock is free instead of raising.
        on_wait: called once with the waiting message before blocking.

    Raises:
        LockBusy: another process or thread holds it and ``wait`` is false: '``what`` is in use by pid ... on
            host ... since ...', then ``hint``.
        iwae.files.LinkRefused: ``path`` is a symbolic link.
    """
    path = Path(path)
    fd = open_lock(path, "the lock")  # no O_TRUNC: the holder's text must survive our attempt
    stat = os.fstat(fd)
    key = (stat.st_dev, stat.st_ino)
    held = _held.__dict__.setdefault("files", {})
    if key in held:  # this thread holds it already
        os.close(fd)
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    try:
        if not _try_lock(fd, block=False):
            message = f"{what} is in use by {holder(path)}"
            if not wait:
                raise LockBusy(f"{message}; {hint}" if hint else message)
            if on_wait is not None:
                on_wait(f"waiting: {message}")
            _try_lock(fd, block=True)
        since = datetime.now(UTC).isoformat(timespec="seconds")
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, text.encode() + b"\n")
        held[key] = 1
        try:
            yield
        finally:
            del held[key]
    finally:
        os.close(fd)  # releases the lock
