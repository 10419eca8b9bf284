"""The server's persistent job queue: one SQLite table, safe across threads and restarts.

A job is ``queued`` -> ``running`` -> ``done`` | ``failed`` (or ``cancelled`` while still queued). Jobs run in
submission order. Opening the store re-queues jobs that were ``running`` when the process died, so nothing is lost;
queued and finished jobs simply stay. Every state change is one committed transaction (WAL journal, synchronous
commits), so a kill at any moment leaves the queue consistent.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import hold_lock

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
MAX_ATTEMPTS = 3  # a job that was running when the process died this many times is failed, not run again

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    options TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    files TEXT NOT NULL DEFAULT '{}',
    timings TEXT NOT NULL DEFAULT '{}',
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


class StoreInUse(ValueError):
    """Another process has this queue open."""


class QueueFull(Exception):
    """The queue already holds its maximum number of unfinished jobs."""


@dataclass
class Job:
    """One row of the queue, as stored."""

    id: str
    status: str
    options: dict[str, Any]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total: int = 0
    attempts: int = 0
    error: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # the exact values the job ran with (when done)
    position: int | None = None  # 1-based place among queued jobs (filled by JobStore.get)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"], status=row["status"], options=json.loads(row["options"]), created_at=row["created_at"],
            started_at=row["started_at"], finished_at=row["finished_at"], step=row["step"], total=row["total"],
            attempts=row["attempts"], error=row["error"], files=json.loads(row["files"]),
            timings=json.loads(row["timings"]), settings=json.loads(row["settings"]),
        )  # fmt: skip


def new_job_id() -> str:
    """An unguessable id (128 random bits): a result is reachable only by whoever holds its id."""
    return secrets.token_urlsafe(16)


class JobStore:
    """The queue in one SQLite file; every method is one transaction and may be called from any thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        lock = self.path.with_name(self.path.name + ".lock")  # two servers on one queue re-queue each other's jobs
        try:
            self._owner = hold_lock(lock, f"another chronoedit serve is using the job queue {self.path}")
        except ValueError as exc:
            raise StoreInUse(str(exc)) from None
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"job database {self.path} cannot be used: {exc}") from exc
        self.requeued = self._requeue_running()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _requeue_running(self) -> int:
        """Jobs left ``running`` by a process that died go back to the queue, in their original order; one that
        was running at :data:`MAX_ATTEMPTS` deaths (it may be what kills the process) is failed instead."""
        error = f"the server stopped {MAX_ATTEMPTS} times while running this edit; not trying again"
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET status=?, finished_at=?, error=? WHERE status=? AND attempts>=?",
                (FAILED, time.time(), error, RUNNING, MAX_ATTEMPTS),
            )
            cursor = db.execute("UPDATE jobs SET status=?, step=0, started_at=NULL WHERE status=?", (QUEUED, RUNNING))
            return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._owner.close()  # releases the process lock

    # ----- submitting and reading ---------------------------------------------------------------------------
    def submit(self, options: dict[str, Any], max_pending: int, job_id: str | None = None, total: int = 0) -> Job:
        """Queue a job; :class:`QueueFull` when ``max_pending`` jobs are already queued or running."""
        job = Job(id=job_id or new_job_id(), status=QUEUED, options=options, created_at=time.time())
        with self._transaction() as db:
            pending = db.execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", (QUEUED, RUNNING)).fetchone()[0]
            if pending >= max_pending:
                raise QueueFull(f"the queue is full ({pending} jobs waiting or running, the limit is {max_pending})")
            db.execute(
                "INSERT INTO jobs (id, status, options, created_at, total) VALUES (?, ?, ?, ?, ?)",
                (job.id, job.status, json.dumps(options), job.created_at, total),
            )
        return job

    def get(self, job_id: str) -> Job | None:
        """The job with this id (with its queue position when queued), or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            job = Job.from_row(row)
            if job.status == QUEUED:
                ahead = self._db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE status=? AND seq<?", (QUEUED, row["seq"])
                ).fetchone()[0]
                job.position = ahead + 1
        return job

    def counts(self) -> dict[str, int]:
        """Number of jobs in each status."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: 0 for status in (QUEUED, RUNNING, DONE, FAILED, CANCELLED)} | {r[0]: r[1] for r in rows}

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job; False when it is not queued (running and finished jobs stay as they are)."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET status=?, finished_at=? WHERE id=? AND status=?",
                (CANCELLED, time.time(), job_id, QUEUED),
            )
            return cursor.rowcount == 1

    # ----- the worker's side --------------------------------------------------------------------------------
    def claim_next(self) -> Job | None:
        """Mark the oldest queued job ``running`` and return it (None when the queue is empty)."""
        with self._transaction() as db:
            row = db.execute(
                "UPDATE jobs SET status=?, started_at=?, step=0, attempts=attempts+1 "
                "WHERE seq=(SELECT seq FROM jobs WHERE status=? ORDER BY seq LIMIT 1) RETURNING *",
                (RUNNING, time.time(), QUEUED),
            ).fetchone()
        return None if row is None else Job.from_row(row)

    def finish(self, job_id: str, files: dict[str, str], timings: dict[str, float], settings: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET status=?, finished_at=?, step=total, files=?, timings=?, settings=?, error=NULL "
                "WHERE id=?",
                (DONE, time.time(), json.dumps(files), json.dumps(timings), json.dumps(settings), job_id),
            )

    def requeue(self, job_id: str) -> None:
        """Put a running job back at its place in the queue, the attempt not counted (a clean shutdown)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET status=?, step=0, started_at=NULL, attempts=MAX(attempts-1, 0) "
                "WHERE id=? AND status=?",
                (QUEUED, job_id, RUNNING),
            )

    # ----- retention ---------------------------------------------------------------------------------------
    def delete_finished_before(self, cutoff: float) -> list[str]:
        """Delete the finished jobs whose ``finished_at`` is before ``cutoff`` (a ``time.time()``); their ids."""
        marks = ", ".join("?" * len(FINISHED))
        with self._transaction() as db:
            rows = db.execute(
                f"DELETE FROM jobs WHERE status IN ({marks}) AND finished_at < ? RETURNING id", (*FINISHED, cutoff)
            ).fetchall()
        return [row[0] for row in rows]

    def ids(self) -> set[str]:
        """The ids of every job in the store."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT id FROM jobs")}

    def fail(self, job_id: str, error: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET status=?, finished_at=?, error=? WHERE id=?", (FAILED, time.time(), error, job_id)
            )

