"""The SQLite results store (iwae.lab.store) under concurrent writers, and the columns and statuses it takes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from iwae.lab.store import ResultStore

# Run in separate interpreters that import only iwae.lab.store (no torch), so they start fast and write at once.
WRITER = """
import sys
from iwae.lab.store import ResultStore
db_path, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = ResultStore(db_path)
for i in range(n):
    name = f"w{worker}-r{i}"
    store.upsert(name, config={"worker": worker, "i": i}, status="running", started="t0")
    store.upsert(name, status="finished", eval={"nll": worker * 1000 + i}, metrics=[{"epoch": 1}], seconds=i)
    store.upsert("shared", config={"last": worker}, status="running")  # every writer hits one row too
"""


def test_concurrent_writers_do_not_corrupt_the_database(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    ResultStore(db)
    workers, n = 4, 40
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(w), str(n)]) for w in range(workers)]
    assert [p.wait(120) for p in processes] == [0] * workers
    store = ResultStore(db)
    assert store.integrity() == "ok"
    rows = {row["name"]: row for row in store.rows()}
    assert len(rows) == workers * n + 1
    for w in range(workers):
        for i in range(n):
            row = rows[f"w{w}-r{i}"]
            assert row["status"] == "finished" and row["eval"] == {"nll": w * 1000 + i}
            assert row["config"] == {"worker": w, "i": i} and row["metrics"] == [{"epoch": 1}]
    assert rows["shared"]["config"]["last"] in range(workers)


def test_store_rejects_unknown_columns_and_statuses(tmp_path: Path) -> None:
    store = ResultStore.in_dir(tmp_path)
    with pytest.raises(ValueError, match="unknown result columns"):
        store.upsert("a", colour="red")
    with pytest.raises(ValueError, match="status must be"):
        store.upsert("a", status="done")
    store.upsert("a", config={"k": 1})
    assert store.get("a")["status"] == "pending" and store.get("b") is None
