"""Keep freed tensor memory in the process instead of handing it back to the OS after every step (glibc).

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its *mmap threshold* with a fresh
``mmap`` and unmaps it when it is freed; the threshold starts at 128 KiB and rises only as the process frees
such blocks, to at most 32 MiB, and more than twice the threshold free at the top of the heap is trimmed
back to the OS. A training step allocates the same large temporaries every time (the ``[k, batch, x_dim]``
logits and their gradient), so whether all their pages are faulted in again on every step depends on the
block sizes and on what the process happened to free before. Measured on the project's 2-core CPU: at
k = 50, minibatch 1,000 (160 MB of logits, above any dynamic threshold) 162,000 page faults and 770-790 ms
a step, against none and 500-510 ms with the thresholds fixed as below; at minibatch 20 in a fresh process
2,400 faults and 19-20 ms, against none and 12-15 ms (``iwae train`` had already raised the threshold by
loading MNIST, so it was close to the fixed case there).

:func:`configure` fixes both thresholds with ``mallopt``, which also turns glibc's adjustment off: blocks up
to :data:`MMAP_THRESHOLD` come from the heap and stay mapped when freed, and the heap is trimmed only when
more than :data:`TRIM_THRESHOLD` is free at its top. The price is freed memory kept resident: peak resident
memory rose from 1.13 to 1.32 GB in that minibatch-1,000 training run, and from 0.80 to 1.32 GB in an
``iwae eval`` of the test set, which gained no speed. So the command line calls it only for the commands
that train, ``iwae train`` and ``iwae bench`` (so that every implementation the bench compares trains
under the same settings); library users can call it themselves.
``IWAE_FAST`` without ``allocator`` (:mod:`iwae.fast.switches`), or a C library other than glibc, leaves
the allocator as it is.
"""

from __future__ import annotations

import ctypes
import functools
import os

from iwae.fast import switches

MMAP_THRESHOLD = 512 * 2**20  # bytes: larger blocks are still mmap'ed (and unmapped when freed)
TRIM_THRESHOLD = 1024 * 2**20  # bytes of free memory at the top of the heap kept before trimming
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)


def _glibc_version() -> str | None:
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    return name if name and name.startswith("glibc") else None


@functools.cache
def configure() -> str:
    """Fix glibc's mmap and trim thresholds for this process (once); one line saying what was done."""
    if not switches.enabled("allocator"):
        return f"the platform's default allocator settings ({switches.why_off('allocator')})"
    version = _glibc_version()
    if version is None:
        return "the platform's default allocator settings (not glibc)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return f"the platform's default allocator settings ({version} without mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return f"the platform's default allocator settings ({version} refused mallopt)"
    return (
        f"{version} malloc with fixed thresholds: mmap above {MMAP_THRESHOLD // 2**20} MiB, "
        f"trim above {TRIM_THRESHOLD // 2**20} MiB (iwae.fast.allocator)"
    )
