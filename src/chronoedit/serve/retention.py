"""Deleting finished jobs a set time after they finish (``chronoedit serve --keep-results-hours``).

A finished job (done, failed or cancelled) older than the retention period loses its queue record first and its
folder (input, outputs) second, so a crash in between leaves only a folder no id reaches; such folders, and those of
uploads whose submission died before the job was queued, are removed once they are older than the period too.
Queued and running jobs are never touched. Without a retention period nothing is ever deleted.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from .store import JobStore

log = logging.getLogger("chronoedit.serve")


def expire(store: JobStore, results_dir: Path, keep_s: float, now: float | None = None) -> int:
    """Delete the jobs that finished more than ``keep_s`` seconds ago and their folders; how many went."""
    now = time.time() if now is None else now
    ids = store.delete_finished_before(now - keep_s)
    for job_id in ids:
        shutil.rmtree(results_dir / job_id, ignore_errors=True)
    return len(ids)


def remove_orphans(store: JobStore, results_dir: Path, keep_s: float, now: float | None = None) -> int:
    """Delete job folders with no job in the queue, last changed more than ``keep_s`` seconds ago; how many."""
    if not results_dir.is_dir():
        return 0
    now = time.time() if now is None else now
    known = store.ids()
    removed = 0
    for folder in results_dir.iterdir():
        try:
            stale = folder.is_dir() and folder.name not in known and folder.stat().st_mtime < now - keep_s
        except OSError:  # removed meanwhile
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


class Retention:
    """Runs :func:`expire` at most every ``every_s`` seconds (the worker calls :meth:`maybe_sweep` between jobs)."""

    def __init__(self, store: JobStore, results_dir: Path, keep_s: float | None, every_s: float = 60.0) -> None:
        self.store, self.results_dir, self.keep_s, self.every_s = store, results_dir, keep_s, every_s
        self._last = float("-inf")

    def maybe_sweep(self) -> None:
        if self.keep_s is None or time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        try:
            expired = expire(self.store, self.results_dir, self.keep_s)
            orphans = remove_orphans(self.store, self.results_dir, self.keep_s)
        except Exception as exc:  # e.g. the disk is busy: the next sweep tries again
            log.error("chronoedit serve: deleting old results failed: %s", " ".join(str(exc).split()))
            return
        if expired or orphans:
            log.info("chronoedit serve: deleted %d finished job(s) and %d stray folder(s)", expired, orphans)
