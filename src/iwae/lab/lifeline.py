"""Worker processes that end with the sweep that started them, however the sweep ends (``kill -9`` included).

A sweep's workers are forked by a forkserver, itself a child of the sweep. Two mechanisms tie them to it:

- On Linux the kernel signals a process when its parent ends (``prctl(PR_SET_PDEATHSIG, SIGKILL)``): the
  forkserver dies with the sweep, and each worker with the forkserver. The forkserver gets the setting by
  importing this module first (:data:`iwae.lab.runner.PRELOAD`): the import sets it in a process whose
  parent is the sweep named in ``$IWAE_SWEEP_PID`` (the sweep sets it while starting the server), and nowhere
  else, so importing this module elsewhere changes nothing.
- On every platform, :func:`watch` starts a thread in the worker that ends it (``os._exit``) within a second
  once the sweep's pid is gone or its own parent has changed.

Killed workers leave at most a checkpoint to resume from (every file is written atomically), and their run
locks (:mod:`iwae.locks`) are dropped by the kernel. Once every process holding multiprocessing's resource
tracker's pipe has ended, the tracker ends too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

SWEEP_PID_ENV = "IWAE_SWEEP_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
EXIT_ORPHANED = 70
INTERVAL_S = 1.0


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent ends (Linux); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts until its parent reaps it; the parent check covers that)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, under another user
        return True
    return True


def watch(sweep_pid: int, interval_s: float = INTERVAL_S) -> None:
    """Tie this worker to the sweep ``sweep_pid``.

    It dies with its parent (:func:`die_with_parent`), and a thread checks every ``interval_s`` that the sweep and
    the parent are still there, ending this process at once if not (the first check is now).
    """
    parent = os.getppid()
    die_with_parent()

    def orphaned() -> bool:
        return os.getppid() != parent or not alive(sweep_pid)

    if orphaned():  # the parent ended before prctl took effect
        os._exit(EXIT_ORPHANED)

    def loop() -> None:
        while not orphaned():
            time.sleep(interval_s)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=loop, name="iwae-lifeline", daemon=True).start()


# Imported first by the forkserver of a sweep (see the module's docstring): there, die with the sweep.
if os.environ.get(SWEEP_PID_ENV) == str(os.getppid()):
    die_with_parent()
