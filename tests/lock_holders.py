"""A lock held by someone else, for tests in one process: a lock is re-entrant for the thread that holds it
(:mod:`iwae.locks`), so "another writer" is another thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from iwae import locks


@contextmanager
def held_by_another_thread(path: str | Path, what: str = "a test") -> Iterator[None]:
    """Hold the lock ``path`` from a second thread of this process for the block."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with locks.hold(path, what=what):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert held.wait(10), "the lock could not be taken"
    try:
        yield
    finally:
        release.set()
        thread.join(10)
