"""The results database of a sweep: one SQLite file (``DIR/results.sqlite``), one row per run.

A sweep is the database's one writer: its workers and cluster jobs write each run's row to the run's
``result.json``, which the sweep (or ``iwae results DIR --rescan``) indexes here (:mod:`iwae.lab.sweep`), so no
process on another machine writes the file over a shared file system. Processes on one machine may still write at
once (``execute`` called by a launcher, readers during a sweep), so:

- the database runs in WAL mode (readers never block the writer);
- every connection waits up to ``BUSY_TIMEOUT_S`` for a lock;
- each write is one short transaction, retried with back-off while SQLite reports the database busy or locked.

A row (:data:`COLUMNS`) holds the run's configuration (JSON); its status (one of :data:`STATUSES`; ``diverged``: a
non-finite bound stopped it); timestamps (ISO 8601, UTC); timings (``seconds``: training time summed over epochs
and resumed calls, ``seconds_per_epoch`` its mean); the final train and validation bounds; the evaluation results
(the ``eval.json`` object, JSON); the per-epoch metrics (JSON list, for learning curves); and the environment it
ran in (package and torch versions, device, git commit or NULL).

No tensors live here; the shape convention of the package does not arise.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from iwae.files import check_derived

DB_FILE = "results.sqlite"
BUSY_TIMEOUT_S = 60.0
RETRIES = 20
STATUSES = ("pending", "running", "finished", "failed", "diverged")

COLUMNS: dict[str, str] = {
    "name": "TEXT PRIMARY KEY",
    "phase": "TEXT",
    "run_dir": "TEXT",
    "config": "TEXT NOT NULL",
    "status": "TEXT NOT NULL",
    "started": "TEXT",
    "finished": "TEXT",
    "seconds": "REAL",
    "seconds_per_epoch": "REAL",
    "epochs_done": "INTEGER",
    "train_bound": "REAL",
    "valid_bound": "REAL",
    "eval": "TEXT",
    "metrics": "TEXT",
    "samples_png": "TEXT",
    "package_version": "TEXT",
    "torch_version": "TEXT",
    "device": "TEXT",
    "git_commit": "TEXT",
    "error": "TEXT",
}
JSON_COLUMNS = ("config", "eval", "metrics")

T = TypeVar("T")


def now() -> str:
    """The current time, ISO 8601 in UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _retry(action: Callable[[], T]) -> T:
    """Run ``action``; on 'database is locked/busy' wait (with jitter) and try again."""
    for attempt in range(RETRIES):
        try:
            return action()
        except sqlite3.OperationalError as error:
            text = str(error).lower()
            if ("locked" not in text and "busy" not in text) or attempt == RETRIES - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


SQLITE_HEADER = b"SQLite format 3\x00"
SIDE_FILES = ("-wal", "-shm", "-journal")  # SQLite's own files beside the database


def check_database(path: Path) -> None:
    """Refuse, reading only, a results database that cannot be one: a symbolic link (at the file or one of SQLite's
    side files), an empty file or a file that is no SQLite database. A missing file is fine (a sweep creates it).

    Raises:
        iwae.files.LinkRefused: a link.
        ValueError: one line naming the file and what to do.
    """
    for candidate in (path, *(path.with_name(path.name + suffix) for suffix in SIDE_FILES)):
        check_derived(candidate, "the results database")
    if not path.exists():
        return
    rebuild = "move it away and run 'iwae results DIR --rescan' to rebuild it from the runs' result files"
    try:
        with open(path, "rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as error:
        raise ValueError(f"{path} cannot be read ({error.strerror}); {rebuild}") from None
    if not header:
        raise ValueError(f"{path} is empty, not a results database; {rebuild}")
    if header != SQLITE_HEADER:
        raise ValueError(f"{path} is not a SQLite database; {rebuild}")


class ResultStore:
    """A sweep's SQLite database (created on first use). Connections are opened per operation.

    ``create=False`` opens an existing database to read it, changing nothing (no table, no journal mode): what
    ``iwae results`` and ``iwae report`` use.
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        check_database(self.path)
        if not create:
            if not self.path.is_file():
                raise ValueError(f"{self.path.parent} holds no {self.path.name}; run 'iwae sweep GRID --out DIR' first")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _retry(self._create)

    @classmethod
    def in_dir(cls, directory: str | Path, *, create: bool = True) -> ResultStore:
        """The store of the sweep folder ``directory`` (``DIR/results.sqlite``)."""
        return cls(Path(directory) / DB_FILE, create=create)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for one operation. A database error other than a busy one (which :func:`_retry` waits out)
        is a one-line ``ValueError``: a file that is SQLite but not a sweep's database, or damaged."""
        try:
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            try:
                connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                connection.row_factory = sqlite3.Row
                yield connection
            finally:
                connection.close()
        except sqlite3.DatabaseError as error:
            text = str(error).lower()
            if isinstance(error, sqlite3.OperationalError):
                if "locked" in text or "busy" in text:
                    raise
                if "no such table" not in text:  # a permission, a full disk, a missing folder: the file may be fine
                    raise ValueError(f"{self.path} cannot be used now ({error}); fix that and rerun") from None
            raise ValueError(
                f"{self.path} cannot be used as a results database ({error}); move it away and run "
                "'iwae results DIR --rescan' to rebuild it from the runs' result files"
            ) from None

    def _create(self) -> None:
        with self._connect() as db:
            db.execute("PRAGMA journal_mode = WAL")
            columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS runs ({columns})")

    def _write(self, sql: str, values: tuple[Any, ...]) -> None:
        def action() -> None:
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute(sql, values)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise

        _retry(action)

    def upsert(self, name: str, **fields: Any) -> None:
        """Insert the run ``name`` or update the given fields of its row (dicts/lists stored as JSON)."""
        unknown = set(fields) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns: {sorted(unknown)}")
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {fields['status']!r}")
        encoded = {
            key: json.dumps(value) if key in JSON_COLUMNS and value is not None else value
            for key, value in fields.items()
        }
        existing = self.get(name)
        if existing is None:
            encoded.setdefault("status", "pending")
            encoded.setdefault("config", "{}")
            keys = ["name", *encoded]
            sql = f"INSERT INTO runs ({', '.join(keys)}) VALUES ({', '.join('?' for _ in keys)})"
            sql += " ON CONFLICT(name) DO UPDATE SET " + ", ".join(f"{k} = excluded.{k}" for k in encoded)
            self._write(sql, (name, *encoded.values()))
        elif encoded:
            assignments = ", ".join(f"{key} = ?" for key in encoded)
            self._write(f"UPDATE runs SET {assignments} WHERE name = ?", (*encoded.values(), name))

    def _read(self, sql: str, values: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        def action() -> list[dict[str, Any]]:
            with self._connect() as db:
                return [self._decode(row) for row in db.execute(sql, values).fetchall()]

        return _retry(action)

    @staticmethod
    def _decode(row: sqlite3.Row) -> dict[str, Any]:
        record = dict(row)
        for key in JSON_COLUMNS:
            if record.get(key) is not None:
                record[key] = json.loads(record[key])
        return record

    def get(self, name: str) -> dict[str, Any] | None:
        """The run's row (JSON columns decoded), or None."""
        rows = self._read("SELECT * FROM runs WHERE name = ?", (name,))
        return rows[0] if rows else None

    def rows(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every row, or those with ``status``, in insertion order."""
        if status is None:
            return self._read("SELECT * FROM runs ORDER BY rowid")
        return self._read("SELECT * FROM runs WHERE status = ? ORDER BY rowid", (status,))

    def integrity(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` answer (``"ok"`` for a sound file)."""
        def action() -> str:
            with self._connect() as db:
                return str(db.execute("PRAGMA integrity_check").fetchone()[0])

        return _retry(action)
