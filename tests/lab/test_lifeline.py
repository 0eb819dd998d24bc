"""iwae.lab.lifeline: whether a process is still there (the check a sweep's workers make of their sweep), and a
worker tied to a sweep that is already gone ending at once. (Workers dying with a killed sweep:
tests/integration/test_sweep_safety.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

from iwae.lab import lifeline


def test_alive_tells_a_running_process_from_one_that_has_ended() -> None:
    assert lifeline.alive(os.getpid())
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # reaped: its pid is free
    assert not lifeline.alive(ended.pid)


def test_a_worker_whose_sweep_is_gone_ends_at_once() -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    script = (
        "import time\nfrom iwae.lab import lifeline\n"
        f"lifeline.watch({ended.pid}, interval_s=0.05)\n"
        "time.sleep(30)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert completed.returncode == lifeline.EXIT_ORPHANED, completed.stderr
