"""The report tests' shared sweep database: ``made_up`` (tests/lab/reports/test_tables.py and test_render.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from report_rows import finished_row

from iwae.lab.store import ResultStore


@pytest.fixture
def made_up(tmp_path: Path) -> Path:
    """A sweep database with invented results (inputs for the arithmetic, not measurements)."""
    store = ResultStore.in_dir(tmp_path)
    finished_row(store, "vae-k1", tmp_path, 90.0, [10], objective="vae", k=1)
    finished_row(store, "vae-k5", tmp_path, 89.5, [11], objective="vae", k=5)
    finished_row(store, "iwae-k1", tmp_path, 90.0, [10], objective="iwae", k=1)
    finished_row(store, "iwae-k5", tmp_path, 88.0, [14], objective="iwae", k=5)
    finished_row(store, "iwae-k5-s1", tmp_path, 87.0, [16], objective="iwae", k=5, seed=1)
    finished_row(store, "swap", tmp_path, 87.5, [12], objective="iwae", k=50, init_from=str(tmp_path / "vae-k1"))
    store.upsert("broken", config={"k": 1}, status="failed", error="RuntimeError: boom")
    return tmp_path
