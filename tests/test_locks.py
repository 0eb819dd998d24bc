"""iwae.locks: a lock held is refused to a second holder in one line naming the holder (pid, host, since when),
or waited for; released when its holder's block ends. (Locks across processes, a killed holder included:
tests/integration/test_sweep_safety.py.)"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from iwae import locks
from iwae.files import LinkRefused


def test_a_held_lock_is_refused_naming_its_holder_and_free_again_once_released(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    with locks.hold(path, what="the sweep folder"):
        assert locks.holder(path).startswith(f"pid {os.getpid()} on host {socket.gethostname()} since ")
        refused = []

        def other_thread() -> None:  # flock locks an open file: another thread's open is another holder
            try:
                with locks.hold(path, what="the sweep folder", hint="wait for it"):
                    pass
            except locks.LockBusy as busy:
                refused.append(str(busy))

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(10)
        assert refused == [f"the sweep folder is in use by {locks.holder(path)}; wait for it"]
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


def test_the_holding_thread_takes_its_lock_again_and_keeps_it_until_the_outer_block_ends(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    busy = []

    def try_from_another_thread() -> None:
        def attempt() -> None:
            try:
                with locks.hold(path, what="run r"):
                    busy.append(False)
            except locks.LockBusy:
                busy.append(True)

        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join(10)

    with locks.hold(path, what="run r"):
        with locks.hold(path, what="run r"):  # a sweep's worker, then fit_runs: the same lock, no refusal
            try_from_another_thread()
        try_from_another_thread()  # the inner block's end keeps the outer one's lock
    try_from_another_thread()  # released
    assert busy == [True, True, False]


@pytest.mark.parametrize("dangling", [False, True])
def test_a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path: Path, dangling) -> None:
    target = tmp_path / "precious.txt"
    if not dangling:
        target.write_text("keep me\n")
    (tmp_path / ".lock").symlink_to(target)
    with pytest.raises(LinkRefused, match="symbolic link"), locks.hold(tmp_path / ".lock", what="run r"):
        pass
    assert (target.read_text() == "keep me\n") if not dangling else not target.exists()
