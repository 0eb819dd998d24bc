"""iwae.lab.bench.memory: the peak resident memory rises by what the process touches, measured from a reset peak."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from iwae.lab.bench import memory

# In a fresh process: here, memory freed by earlier tests may stay resident (iwae.fast.allocator keeps it) and be
# reused without raising the peak.
SCRIPT = """
import json, torch
from iwae.lab.bench import memory
baseline = memory.memory_baseline()
block = torch.ones(32 * 2**20 // 4)  # 32 MiB, written
print(json.dumps([baseline, memory.rss_mb()[1]]))
"""


def test_the_peak_rises_by_what_is_allocated_after_the_baseline() -> None:
    current, peak = memory.rss_mb()
    assert peak is not None and (current is None or 0 < current <= peak)
    if not memory.reset_peak_rss():
        pytest.skip("the peak cannot be reset here (/proc/self/clear_refs)")
    completed = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    baseline, after = json.loads(completed.stdout)
    assert after - baseline >= 24, (baseline, after)
