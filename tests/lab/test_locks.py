"""iwae.lab.locks: a lock held is refused to a second holder in one line naming the holder (pid, host, since when),
or waited for; released when its holder's block ends. (Locks across processes, a killed holder included:
tests/integration/test_sweep_safety.py.)"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from iwae.lab import locks


def test_a_held_lock_is_refused_naming_its_holder_and_free_again_once_released(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    with locks.hold(path, what="the sweep folder"):
        assert locks.holder(path).startswith(f"pid {os.getpid()} on host {socket.gethostname()} since ")
        # flock locks an open file: a second open of the same file is a second holder, even in this process
        with pytest.raises(locks.LockBusy) as refused, locks.hold(path, what="the sweep folder", hint="wait for it"):
            pass
        assert str(refused.value) == f"the sweep folder is in use by {locks.holder(path)}; wait for it"
    with locks.hold(path, what="the sweep folder"):  # released: taken at once
        pass
    path.write_text("not the holder's json\n")
    assert locks.holder(path) == "another process"
    assert locks.holder(tmp_path / "missing") == "another process"


def test_a_waiting_holder_says_so_and_takes_the_lock_when_it_is_released(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    held, release = threading.Event(), threading.Event()

    def first() -> None:
        with locks.hold(path, what="run r"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    assert held.wait(10)
    said = []

    def on_wait(message: str) -> None:
        said.append(message)
        threading.Timer(0.2, release.set).start()

    started = time.monotonic()
    with locks.hold(path, what="run r", wait=True, on_wait=on_wait):
        assert release.is_set() and time.monotonic() - started >= 0.2
    thread.join(10)
    assert len(said) == 1 and said[0].startswith(f"waiting: run r is in use by pid {os.getpid()} on host ")
