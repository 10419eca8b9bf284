"""Deleting finished jobs a set time after they finish (``chronoedit serve --keep-results-hours``).

A finished job (done, failed or cancelled) older than the retention period loses its queue record first, so new
requests for it get 404; its folder (input, outputs) goes a grace period later, so a request that found the job just
before can still open its file. Folders no job owns (a crash between the two steps, or an upload whose submission
died before its job was queued) are removed once they are older than the period too. Queued and running jobs are
never touched. Without a retention period nothing is ever deleted.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from ..errors import one_line
from .store import JobStore

log = logging.getLogger("chronoedit.serve")


def remove_orphans(store: JobStore, results_dir: Path, keep_s: float, now: float | None = None,
                   spare: set[str] | frozenset[str] = frozenset()) -> int:  # fmt: skip
    """Delete job folders with no job in the queue (and not in ``spare``), last changed more than ``keep_s``
    seconds ago; how many."""
    if not results_dir.is_dir():
        return 0
    now = time.time() if now is None else now
    known = store.ids() | spare
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
    """Deletes old finished jobs; the worker calls :meth:`maybe_sweep` between jobs (a sweep at most every
    ``every_s`` seconds). Folders go ``grace_s`` seconds after their records."""

    def __init__(self, store: JobStore, results_dir: Path, keep_s: float | None, every_s: float = 60.0,
                 grace_s: float = 60.0) -> None:  # fmt: skip
        self.store, self.results_dir, self.keep_s = store, results_dir, keep_s
        self.every_s, self.grace_s = every_s, grace_s
        self.doomed: dict[str, float] = {}  # job id -> when its record was deleted
        self._last = float("-inf")

    def maybe_sweep(self) -> None:
        if self.keep_s is None or time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        try:
            self.sweep()
        except Exception as exc:  # e.g. the disk is busy: the next sweep tries again
            log.error("chronoedit serve: deleting old results failed: %s", one_line(exc))

    def sweep(self, now: float | None = None) -> tuple[int, int]:
        """Delete the records of jobs finished more than ``keep_s`` ago, the folders whose grace is over, and stray
        folders; (records, folders) deleted."""
        if self.keep_s is None:
            return 0, 0
        now = time.time() if now is None else now
        expired = self.store.delete_finished_before(now - self.keep_s)
        self.doomed.update(dict.fromkeys(expired, now))
        ripe = [job_id for job_id, when in self.doomed.items() if when <= now - self.grace_s]
        for job_id in ripe:
            shutil.rmtree(self.results_dir / job_id, ignore_errors=True)
            del self.doomed[job_id]
        orphans = remove_orphans(self.store, self.results_dir, self.keep_s, now, spare=set(self.doomed))
        if expired or ripe or orphans:
            log.info("chronoedit serve: deleted %d finished job(s), %d folder(s) and %d stray folder(s)",
                     len(expired), len(ripe), orphans)  # fmt: skip
        return len(expired), len(ripe) + orphans
