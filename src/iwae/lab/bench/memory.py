"""Peak resident memory of this process, for the evaluation worker's report.

On Linux the peak is VmHWM of ``/proc/self/status``, which can be reset to the current resident memory
(``/proc/self/clear_refs``); ``getrusage``'s ``ru_maxrss`` carries the parent's peak across fork and exec,
so it is the fallback only where ``/proc`` is missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]


def rss_mb() -> tuple[float | None, float | None]:
    """(current, peak) resident memory of this process in MiB.

    On Linux from ``/proc/self/status`` (VmRSS, VmHWM): the peak belongs to this process image only,
    whereas ``getrusage``'s ``ru_maxrss`` keeps the parent's peak across fork and exec. Elsewhere
    ``(None, ru_maxrss)``, or ``(None, None)`` where ``resource`` is missing.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        if "VmRSS" in fields and "VmHWM" in fields:
            return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    if resource is None:
        return None, None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return None, rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the peak resident memory (VmHWM) to the current one (Linux >= 4.0); False where that fails."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory_baseline() -> float | None:
    """The resident memory that later peaks are measured against: the current one after a peak reset,
    else the peak so far."""
    current, peak = rss_mb()
    return current if reset_peak_rss() and current is not None else peak
