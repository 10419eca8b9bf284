"""The one worker that owns the model: loads it once, then runs queued jobs in order, one at a time.

Progress of the running job is kept in memory (it changes every step and is worthless after a restart); states are in
the store. A job whose outputs cannot be produced is marked failed with its error as one line; the worker goes on.
A full disk fails the job it hits (health says so until a write succeeds again); an outcome the store cannot record
(the database full or locked) is kept and recorded later, before the next job starts, so the worker never dies of it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..editing import DECODE_STAGE, EditRunner, EditSettings, Report, enhance, wants_trajectory, write_outputs
from ..errors import UserError, one_line
from .editing import INPUT_NAME, PROMPT_NAME, api_message, build_job, output_names, redact, resolved_settings
from .options import EditOptions, Limits, describe_validation
from .retention import Retention
from .store import UNREADABLE, Job, JobStore, is_disk_full

log = logging.getLogger("chronoedit.serve")

LOADING, READY, BROKEN, STOPPED = "loading", "ready", "error", "stopped"
ENHANCING, DENOISING, DECODING, WRITING = "enhancing", "denoising", "decoding", "writing"
DISK_FULL = "the server's disk is full; try again later"


@dataclass
class Progress:
    """The running job's stage (``enhancing`` the prompt, ``denoising``, ``decoding`` the frames with the VAE,
    ``writing`` its files) and denoising progress."""

    job_id: str
    step: int
    total: int
    stage: str = "denoising"


class Interrupted(Exception):
    """The server is shutting down: the running job stops at its next step and goes back to the queue."""


class Worker:
    """A daemon thread: ``start()`` loads the model, then jobs run until ``stop()``.

    ``redact`` maps server paths to placeholders in the errors clients see. ``defaults`` are every job's settings
    before its options. A worker process of ``--devices`` (:mod:`.child`) claims jobs as ``label`` and leaves the
    deleting of old results (``sweep``) to its server.
    """

    def __init__(self, store: JobStore, runner: EditRunner, defaults: EditSettings, results_dir: Path,
                 limits: Limits, enhancer: Any = None, redact: dict[str, Path] | None = None,
                 poll_s: float = 0.5, label: str | None = None, sweep: bool = True) -> None:  # fmt: skip
        self.store, self.runner, self.defaults, self.enhancer = store, runner, defaults, enhancer
        self.results_dir, self.limits, self.poll_s, self.label = results_dir, limits, poll_s, label
        self.redact = {"<results>": results_dir, **(redact or {})}
        keep = limits.keep_results_hours if sweep else None
        self.retention = Retention(store, results_dir, None if keep is None else keep * 3600.0)
        self.state = LOADING
        self.error: str | None = None
        self.progress: Progress | None = None
        self.jobs_run = 0
        self.disk_full = False  # the last write (an upload, a job's outputs, the queue) failed for lack of space
        self.retry_s = 5.0  # wait before trying the store again after it failed
        self._unrecorded: list[tuple[str, Callable[[], None]]] = []  # (job id, the store call recording its outcome)
        self._report = Report(stage=self._on_stage)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (again, after :meth:`stop`)."""
        if self.alive:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._main, name="chronoedit-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A job was queued: look now instead of at the next poll."""
        self._wake.set()

    def request_stop(self) -> None:
        """Ask the loop to end: the running job is interrupted at its next step and re-queued (no waiting)."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float = 300.0) -> None:
        """Stop: the running job is interrupted at its next step and re-queued (waits at most ``timeout`` s)."""
        self.request_stop()
        if self.state == LOADING:  # a load cannot be interrupted: the daemon thread ends with the process
            return
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def spec(self) -> Any:
        """The model this worker runs (a :class:`~chronoedit.editing.ModelSpec`)."""
        return self.runner.spec

    def progress_for(self, job_id: str) -> Progress | None:
        """The progress of ``job_id`` when it is the job running now."""
        progress = self.progress
        return progress if progress is not None and progress.job_id == job_id else None

    @property
    def accepting(self) -> bool:
        """Whether queued jobs will run: the thread lives and the model loads or has loaded."""
        return self.alive and self.state in (LOADING, READY)

    def public_error(self, exc: BaseException) -> str:
        """``exc`` as clients see it (:func:`public_error`)."""
        return public_error(exc, self.redact)

    def _main(self) -> None:
        try:
            self.runner.load()
        except Exception as exc:  # the server stays up to say why (health shows the error)
            self.state, self.error = BROKEN, self.public_error(exc)
            log.error("chronoedit serve: the model did not load: %s", one_line(exc))
            self._changed()
            return
        self.state = READY
        self._changed()
        try:
            self._loop()
        except BaseException as exc:  # never die silently: health shows it and submissions get 503
            self.state, self.error = BROKEN, self.public_error(exc)
            log.exception("chronoedit serve: the worker stopped")
            self._changed()
            return
        self.state = STOPPED
        self._changed()

    def _changed(self) -> None:
        """The state, the running job's progress or the count of jobs run changed (a worker process tells its
        server; the thread has nothing to do: its server reads its attributes)."""

    def _loop(self) -> None:
        """Run queued jobs until stopped; outcomes not yet recorded go first."""
        while not self._stop.is_set():
            self.retention.maybe_sweep()
            if not self.record_outcomes():
                self._stop.wait(self.retry_s)
                continue
            try:
                job = self.store.claim_next() if self.label is None else self.store.claim_next(self.label)
            except Exception as exc:  # e.g. the disk is full: try again shortly
                self.disk_full = self.disk_full or is_disk_full(exc)
                log.error("chronoedit serve: cannot read the job queue: %s", one_line(exc))
                self._stop.wait(self.retry_s)
                continue
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            self.run_job(job)
        if not self.record_outcomes():
            ids = ", ".join(job_id for job_id, _ in self._unrecorded)
            log.error("chronoedit serve: job(s) %s stay running in the queue; they run again after a restart", ids)

    def run_job(self, job: Job) -> None:
        """Run one claimed job to ``done`` or ``failed`` (or back to ``queued`` when the server stops), and record
        that in the store (later, when the store cannot take it now)."""
        try:
            record = self._run(job)
        finally:
            self.progress = None
            self.jobs_run += 1
        self._unrecorded.append((job.id, record))
        self.record_outcomes()
        self._changed()

    def _run(self, job: Job) -> Callable[[], None]:
        """Run one job; the store call that records how it ended."""
        try:
            files, timings, settings = self._edit(job)
        except Interrupted:
            log.info("chronoedit serve: job %s interrupted by shutdown; it runs again after a restart", job.id)
            return lambda: self.store.requeue(job.id)
        except Exception as exc:  # the worker goes on with the next job
            error = self._job_error(job, exc)
            self._discard_outputs(job.id)
            return lambda: self.store.fail(job.id, error)
        self.disk_full = False  # its outputs were written
        return lambda: self.store.finish(job.id, files, timings, settings)

    def _job_error(self, job: Job, exc: Exception) -> str:
        """A failed job's error as clients see it, logged: a full disk and user errors as one line, a bug with its
        traceback."""
        if is_disk_full(exc):
            self.disk_full = True
            log.warning("chronoedit serve: job %s failed, the disk is full: %s", job.id, one_line(exc))
            return self.public_error(exc) if isinstance(exc, UserError) else DISK_FULL
        if isinstance(exc, UserError):
            log.warning("chronoedit serve: job %s failed: %s", job.id, one_line(exc))
        else:
            log.exception("chronoedit serve: job %s failed with an internal error", job.id)
        return self.public_error(exc)

    def _discard_outputs(self, job_id: str) -> None:
        """Delete what a failed job wrote beside its input (no link reaches it; on a full disk it is space)."""
        folder = self.results_dir / job_id
        try:
            leftovers = [p for p in folder.iterdir() if p.name != INPUT_NAME and not p.is_dir()]
            for path in leftovers:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("chronoedit serve: cannot delete the partial outputs of job %s: %s", job_id, one_line(exc))

    def record_outcomes(self) -> bool:
        """Record the outcomes of finished jobs in the store, oldest first; False when the store refuses (they are
        tried again before the next job; a job the process leaves ``running`` is re-queued at the next start)."""
        while self._unrecorded:
            job_id, record = self._unrecorded[0]
            try:
                record()
            except (sqlite3.Error, OSError) as exc:
                self.disk_full = self.disk_full or is_disk_full(exc)
                log.error("chronoedit serve: cannot record the end of job %s (trying again in %g s): %s", job_id,
                          self.retry_s, one_line(exc))  # fmt: skip
                return False
            self._unrecorded.pop(0)
        return True

    def _edit(self, job: Job) -> tuple[dict[str, str], dict[str, float], dict[str, Any]]:
        """Enhance (if asked), edit and write one job; its files, timings and settings."""
        t0 = time.perf_counter()
        options = stored_options(job)
        edit, plan = build_job(self.runner.spec, self.defaults, options, self.results_dir / job.id, self.limits)
        self.progress = Progress(job.id, 0, edit.num_inference_steps, ENHANCING)
        self._changed()
        if options.enhance_prompt:
            if self.enhancer is None:
                raise UserError("this server has no prompt enhancer (start it with --prompt-enhancer-base-url)")
            edit = enhance(edit, self.enhancer)
        self.progress.stage = DENOISING
        self._changed()
        t1 = time.perf_counter()
        out = self.runner.run(edit, wants_trajectory(edit, plan), on_step=self._on_step, report=self._report)
        t2 = time.perf_counter()
        self.progress.stage = WRITING
        self._changed()
        write_outputs(edit, plan, out)
        t3 = time.perf_counter()
        timings = {"prepare_s": t1 - t0, "generate_s": t2 - t1, "write_s": t3 - t2, "total_s": t3 - t0}
        files = output_names(options) | ({"prompt": PROMPT_NAME} if options.enhance_prompt else {})
        return files, {k: round(v, 4) for k, v in timings.items()}, resolved_settings(edit)

    def _on_step(self, step: int, total: int) -> None:
        if self._stop.is_set():
            raise Interrupted
        if self.progress is not None:
            self.progress.step, self.progress.total = step, total
            self._changed()

    def _on_stage(self, message: str) -> None:
        """The application layer's stage lines: the one before the VAE decode sets the job's stage."""
        if self.progress is not None and message == DECODE_STAGE:
            self.progress.stage = DECODING
            self._changed()

    def describe(self) -> dict[str, Any]:
        """The worker's state for ``/v1/health``."""
        return {"state": self.state, "error": self.error, "alive": self.alive, "jobs_run": self.jobs_run,
                "disk_full": self.disk_full}  # fmt: skip


def public_error(exc: BaseException, redactions: dict[str, Path]) -> str:
    """``exc`` as one line in the API's words, without server paths (``redactions``: placeholder -> path); a bug
    shows only as "internal error" (its traceback is in the server's log)."""
    if not isinstance(exc, UserError):
        return "internal error: see the server's log"
    return redact(api_message(exc), redactions)


def stored_options(job: Job) -> EditOptions:
    """A queued job's options, validated again (the row may have been edited); a UserError saying the stored job
    cannot be read otherwise."""
    try:
        return EditOptions.model_validate(job.options)
    except ValidationError as exc:
        raise UserError(f"{UNREADABLE}: options: {describe_validation(exc.errors())}") from None
