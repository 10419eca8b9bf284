"""The server's persistent job queue: one SQLite table, safe across threads and restarts.

A job is ``queued`` -> ``running`` -> ``done`` | ``failed`` (or ``cancelled`` while still queued). Jobs run in
submission order. Opening the store re-queues jobs that were ``running`` when the process died, so nothing is lost;
queued and finished jobs simply stay. Every state change is one committed transaction (WAL journal, synchronous
commits), so a kill at any moment leaves the queue consistent. A row that cannot be read back (its JSON columns
edited by hand or damaged) is failed with a message saying so, never run and never shown as an error of the server.
"""

from __future__ import annotations

import errno
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

from ..errors import UserError, one_line
from ..files import hold_lock, os_reason

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
MAX_ATTEMPTS = 3  # a job that was running when the process died this many times is failed, not run again
JSON_COLUMNS = ("options", "files", "timings", "settings")  # each holds one JSON object
UNREADABLE = "stored job could not be read"

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
    settings TEXT NOT NULL DEFAULT '{}',
    worker TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


class StoreInUse(UserError):
    """Another process has this queue open."""


class UnreadableRow(ValueError):
    """A stored job whose JSON columns do not decode to objects; its message names the column and why."""


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
    worker: str | None = None  # the worker process that claimed it last (``--devices``; None for the thread)
    position: int | None = None  # 1-based place among queued jobs (filled by JobStore.get)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        """The job a row stores; :class:`UnreadableRow` when one of its JSON columns does not decode."""
        options, files, timings, settings = (_json_column(row, name) for name in JSON_COLUMNS)
        return cls(
            id=row["id"], status=row["status"], options=options, created_at=row["created_at"],
            started_at=row["started_at"], finished_at=row["finished_at"], step=row["step"], total=row["total"],
            attempts=row["attempts"], error=row["error"], files=files, timings=timings, settings=settings,
            worker=row["worker"],
        )  # fmt: skip


def _json_column(row: sqlite3.Row, name: str) -> dict[str, Any]:
    """One JSON column of a row as a dict; :class:`UnreadableRow` naming the column otherwise."""
    try:
        value = json.loads(row[name])
    except (TypeError, ValueError, RecursionError) as exc:  # NULL, not JSON, not UTF-8, nested too deep
        raise UnreadableRow(f"{name}: {one_line(exc)}") from None
    if not isinstance(value, dict):
        raise UnreadableRow(f"{name}: not a JSON object")
    return value


def _unreadable_columns(row: sqlite3.Row) -> list[str]:
    """The JSON columns of ``row`` that do not decode to objects."""
    bad = []
    for name in JSON_COLUMNS:
        try:
            _json_column(row, name)
        except UnreadableRow:
            bad.append(name)
    return bad


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is the disk (or the database) being out of space: an OSError
    ENOSPC / EDQUOT, or SQLite's SQLITE_FULL ("database or disk is full")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(seen, sqlite3.Error) and _sqlite_full(seen):
            return True
        seen = seen.__cause__
    return False


def _sqlite_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_FULL
    return "database or disk is full" in str(exc)


def new_job_id() -> str:
    """An unguessable id (128 random bits): a result is reachable only by whoever holds its id."""
    return secrets.token_urlsafe(16)


class JobStore:
    """The queue in one SQLite file; every method is one transaction and may be called from any thread."""

    def __init__(self, path: str | Path, owner: bool = True) -> None:
        """Open (or create) the queue at ``path``; one-line UserErrors when it cannot be: its folder or lock file
        cannot be made, another server holds it (:class:`StoreInUse`), the database is read-only or damaged.

        ``owner=False`` is a server's worker process: it shares its server's queue, so it neither takes the lock
        file nor re-queues running jobs (the server does both)."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self.requeued = 0
        if not owner:
            self._owner = None
            self._db = self._connect()
            return
        lock = self.path.with_name(self.path.name + ".lock")  # two servers on one queue re-queue each other's jobs
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._owner = hold_lock(lock, f"another chronoedit serve is using the job queue {self.path}")
        except OSError as exc:
            raise UserError(f"cannot open the job queue {self.path}: {os_reason(exc, self.path)}") from None
        except UserError as exc:
            raise StoreInUse(str(exc)) from None
        try:
            self._db = self._connect()
            self._db.executescript(_SCHEMA)
            if "worker" not in {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}:
                self._db.execute("ALTER TABLE jobs ADD COLUMN worker TEXT")  # a queue made before --devices
            self.requeued = self._requeue_running()  # a write: a read-only database fails here, at start
        except sqlite3.Error as exc:
            self._owner.close()
            raise UserError(f"job database {self.path} cannot be used: {one_line(exc)}") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite already rolled back after some errors (SQLITE_FULL)
                    self._db.execute("ROLLBACK")
                raise

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
            if self._owner is not None:
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
        """The job with this id (with its queue position when queued), or None. A row that cannot be read is failed
        first (:meth:`fail_unreadable`)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            try:
                job = Job.from_row(row)
            except UnreadableRow as exc:
                problem = exc
            else:
                if job.status == QUEUED:
                    ahead = self._db.execute(
                        "SELECT COUNT(*) FROM jobs WHERE status=? AND seq<?", (QUEUED, row["seq"])
                    ).fetchone()[0]
                    job.position = ahead + 1
                return job
        return self.fail_unreadable(row, problem)

    def fail_unreadable(self, row: sqlite3.Row, problem: UnreadableRow) -> Job:
        """Mark a row that cannot be read failed (its unreadable columns emptied) and return it as now stored; when
        that write fails too (a full disk), the failed job as it will be stored, so a reader never sees an error."""
        try:
            with self._transaction() as db:
                self._mark_unreadable(db, row, problem)
                row = db.execute("SELECT * FROM jobs WHERE seq=?", (row["seq"],)).fetchone()
            return Job.from_row(row)
        except sqlite3.Error:
            return Job(id=row["id"], status=FAILED, options={}, created_at=row["created_at"],
                       finished_at=time.time(), error=f"{UNREADABLE}: {problem}")  # fmt: skip

    @staticmethod
    def _mark_unreadable(db: sqlite3.Connection, row: sqlite3.Row, problem: UnreadableRow) -> None:
        columns = _unreadable_columns(row)
        sets = "".join(f", {name}='{{}}'" for name in columns)  # names from JSON_COLUMNS only
        db.execute(f"UPDATE jobs SET status=?, finished_at=?, error=?{sets} WHERE seq=?",
                   (FAILED, time.time(), f"{UNREADABLE}: {problem}", row["seq"]))  # fmt: skip

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
    def claim_next(self, worker: str | None = None) -> Job | None:
        """Mark the oldest queued job ``running`` (claimed by ``worker``) and return it (None when the queue is
        empty). One ``BEGIN IMMEDIATE`` transaction: of several processes claiming at once each gets its own job.
        Queued rows that cannot be read are failed on the way, not returned."""
        with self._transaction() as db:
            while True:
                row = db.execute(
                    "UPDATE jobs SET status=?, started_at=?, step=0, attempts=attempts+1, worker=? "
                    "WHERE seq=(SELECT seq FROM jobs WHERE status=? ORDER BY seq LIMIT 1) RETURNING *",
                    (RUNNING, time.time(), worker, QUEUED),
                ).fetchone()
                if row is None:
                    return None
                try:
                    return Job.from_row(row)
                except UnreadableRow as exc:
                    self._mark_unreadable(db, row, exc)

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

    def requeue_worker(self, worker: str, died: bool = True) -> list[str]:
        """The jobs ``worker`` (a process that ended) left ``running`` go back to the queue at their place; their ids.
        When it ``died``, the attempt counts, and a job that was running at :data:`MAX_ATTEMPTS` deaths (it may be
        what kills the worker) is failed instead; when the server stopped it, the attempt is not counted."""
        error = f"a worker process died {MAX_ATTEMPTS} times while running this edit; not trying again"
        with self._transaction() as db:
            if died:
                db.execute(
                    "UPDATE jobs SET status=?, finished_at=?, error=? WHERE status=? AND worker=? AND attempts>=?",
                    (FAILED, time.time(), error, RUNNING, worker, MAX_ATTEMPTS),
                )
            uncount = "" if died else ", attempts=MAX(attempts-1, 0)"
            rows = db.execute(
                f"UPDATE jobs SET status=?, step=0, started_at=NULL{uncount} WHERE status=? AND worker=? RETURNING id",
                (QUEUED, RUNNING, worker),
            ).fetchall()
        return [row[0] for row in rows]

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
