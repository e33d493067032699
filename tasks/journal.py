"""The run journal: an SQLite file per enqueue run, recording each distinct request sent.

It keeps enqueue.py's memory flat however many rows it reads (duplicates are found
on disk, not in a Python set), tells `enqueue.py status` what a run sent, and lets an
interrupted run resume without sending a row twice.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

#: Rows written between two commits.
COMMIT_EVERY_ROWS = 5_000

#: SQLite page cache per journal, in KiB (negative means KiB to SQLite).
CACHE_KIB = 8_192

PENDING = "pending"
SENT = "sent"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    key TEXT PRIMARY KEY,
    phrase TEXT NOT NULL,
    file TEXT NOT NULL,
    line INTEGER NOT NULL,
    state TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_by_row ON requests (file, line);
"""


@dataclass(frozen=True)
class FirstSeen:
    """The row where a request was first seen in a run, and the request's state."""

    file: str
    line: int
    state: str


class RunInUseError(Exception):
    """Another process is sending the run whose journal was opened with `lock=True`."""


class RunJournal:
    """One run's journal file: `create` starts a new one, `RunJournal(path)` opens one.

    With `lock=True` the journal is this process's alone until `close()`: a second
    process that requests the lock gets `RunInUseError`. Readers such as `status` open
    it without the lock.
    """

    def __init__(self, path: Path, lock: bool = False) -> None:
        self.path = path
        self._lock_fd = _lock_run(path) if lock else None
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self._db.executescript(_SCHEMA)
        self._db.execute("BEGIN")
        self._uncommitted = 0

    @property
    def run_id(self) -> str:
        return self.path.stem

    @classmethod
    def create(cls, runs_dir: Path, data_dir: Path) -> RunJournal:
        """Start a new run journal in `runs_dir`, named by the UTC start time."""
        runs_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        journal = cls(runs_dir / f"{stamp}.sqlite", lock=True)
        journal.set_meta("data_dir", str(data_dir.resolve()))
        journal.set_meta("started_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        journal.set_meta("state", "running")
        journal.commit()
        return journal

    @classmethod
    def latest(cls, runs_dir: Path) -> Path | None:
        """Return the newest journal file in `runs_dir`, or None."""
        journals = sorted(runs_dir.glob("*.sqlite")) if runs_dir.is_dir() else []
        return journals[-1] if journals else None

    def claim(self, key: str, phrase: str, file: str, line: int) -> FirstSeen | None:
        """Record a request as pending; return None if new, else where it was first seen."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO requests (key, phrase, file, line, state) VALUES (?, ?, ?, ?, ?)",
            (key, phrase, file, line, PENDING),
        )
        self._count_write()
        if cursor.rowcount == 1:
            return None

        first_file, first_line, state = self._db.execute(
            "SELECT file, line, state FROM requests WHERE key = ?", (key,)
        ).fetchone()
        return FirstSeen(first_file, first_line, state)

    def mark_sent(self, keys: Iterable[str]) -> None:
        """Record, and commit, that SQS accepted the messages for these requests.

        Committing here keeps `enqueue.py status` current and lets a run killed at any
        point resume without sending an accepted row again.
        """
        self._db.executemany(
            "UPDATE requests SET state = ? WHERE key = ?", ((SENT, key) for key in keys)
        )
        self.commit()

    def sent_requests(self) -> Iterable[tuple[str, str]]:
        """Yield (key, phrase) of every request SQS accepted."""
        yield from self._db.execute("SELECT key, phrase FROM requests WHERE state = ?", (SENT,))

    def has_row(self, file: str, line: int) -> bool:
        """Return whether this run sent a request first seen at file:line."""
        found = self._db.execute(
            "SELECT 1 FROM requests WHERE file = ? AND line = ? AND state = ?", (file, line, SENT)
        )
        return found.fetchone() is not None

    def counts(self) -> dict[str, int]:
        """Return the number of requests in each state."""
        rows = self._db.execute("SELECT state, COUNT(*) FROM requests GROUP BY state")
        return {PENDING: 0, SENT: 0} | dict(rows.fetchall())

    def set_meta(self, name: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))

    def meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT name, value FROM meta").fetchall())

    def commit(self) -> None:
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")
        self._uncommitted = 0

    def close(self) -> None:
        self._db.execute("COMMIT")
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    def _count_write(self) -> None:
        self._uncommitted += 1
        if self._uncommitted >= COMMIT_EVERY_ROWS:
            self.commit()


def _lock_run(path: Path) -> int:
    """Take the exclusive lock of a run, held by the returned descriptor; raise RunInUseError."""
    lock_path = path.with_suffix(".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunInUseError(
            f"run {path.stem} is being sent by another enqueue.py right now ({lock_path} is "
            "locked): wait for it to end, or pass --new-run to start a separate run"
        ) from None
    return fd
