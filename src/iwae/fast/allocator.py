"""Keep freed tensor memory in the process instead of handing it back to the OS after every step (glibc).

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its *mmap threshold* with a fresh ``mmap`` and
unmaps it when freed; the threshold starts at 128 KiB and rises, to at most 32 MiB, only as the process frees such
blocks, and more than twice the threshold free at the top of the heap is trimmed back to the OS. A training step
allocates the same large temporaries every time (the ``[k, batch, x_dim]`` logits and their gradient), so their pages
may be faulted in again on every step (docs/performance.md#what-makes-the-difference).

:func:`configure` fixes both thresholds with ``mallopt``, which also turns glibc's adjustment off: blocks up to
:data:`MMAP_THRESHOLD` come from the heap and stay mapped when freed, and the heap is trimmed only when more than
:data:`TRIM_THRESHOLD` is free at its top. The price is freed memory kept resident, so the command line calls it only
for the commands that train, ``iwae train`` and ``iwae bench`` (so that every implementation the bench compares
trains under the same settings); library users can call it themselves. ``IWAE_FAST`` without ``allocator``
(:mod:`iwae.fast.switches`), or a C library other than glibc, leaves the allocator as it is.
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
