"""The one worker that owns the model: loads it once, then runs queued jobs in order, one at a time.

Progress of the running job is kept in memory (it changes every step and is worthless after a restart); states are in
the store. A job whose outputs cannot be produced is marked failed with its error as one line; the worker goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..editing import EditRunner, EditSettings, enhance, wants_trajectory, write_outputs
from ..errors import UserError, one_line
from .editing import PROMPT_NAME, api_message, build_job, output_names, redact, resolved_settings
from .options import EditOptions, Limits
from .retention import Retention
from .store import Job, JobStore

log = logging.getLogger("chronoedit.serve")

LOADING, READY, BROKEN, STOPPED = "loading", "ready", "error", "stopped"


@dataclass
class Progress:
    """The running job's stage (``enhancing`` the prompt, ``denoising``) and denoising progress."""

    job_id: str
    step: int
    total: int
    stage: str = "denoising"


class Interrupted(Exception):
    """The server is shutting down: the running job stops at its next step and goes back to the queue."""


class Worker:
    """A daemon thread: ``start()`` loads the model, then jobs run until ``stop()``.

    ``redact`` maps server paths to placeholders in the errors clients see. ``defaults`` are every job's settings
    before its options.
    """

    def __init__(self, store: JobStore, runner: EditRunner, defaults: EditSettings, results_dir: Path,
                 limits: Limits, enhancer: Any = None, redact: dict[str, Path] | None = None,
                 poll_s: float = 0.5) -> None:  # fmt: skip
        self.store, self.runner, self.defaults, self.enhancer = store, runner, defaults, enhancer
        self.results_dir, self.limits, self.poll_s = results_dir, limits, poll_s
        self.redact = {"<results>": results_dir, **(redact or {})}
        keep = limits.keep_results_hours
        self.retention = Retention(store, results_dir, None if keep is None else keep * 3600.0)
        self.state = LOADING
        self.error: str | None = None
        self.progress: Progress | None = None
        self.jobs_run = 0
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

    def stop(self, timeout: float = 300.0) -> None:
        """Stop: the running job is interrupted at its next step and re-queued (waits at most ``timeout`` s)."""
        self._stop.set()
        self._wake.set()
        if self.state == LOADING:  # a load cannot be interrupted: the daemon thread ends with the process
            return
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        """Whether queued jobs will run: the thread lives and the model loads or has loaded."""
        return self.alive and self.state in (LOADING, READY)

    def public_error(self, exc: BaseException) -> str:
        """``exc`` as one line in the API's words, without server paths; a bug shows only as "internal error" (its
        traceback is in the server's log)."""
        if not isinstance(exc, UserError):
            return "internal error: see the server's log"
        return redact(api_message(exc), self.redact)

    def _main(self) -> None:
        try:
            self.runner.load()
        except Exception as exc:  # the server stays up to say why (health shows the error)
            self.state, self.error = BROKEN, self.public_error(exc)
            log.error("chronoedit serve: the model did not load: %s", one_line(exc))
            return
        self.state = READY
        try:
            while not self._stop.is_set():
                self.retention.maybe_sweep()
                try:
                    job = self.store.claim_next()
                except Exception as exc:  # e.g. the disk is full: try again shortly
                    log.error("chronoedit serve: cannot read the job queue: %s", one_line(exc))
                    self._stop.wait(5.0)
                    continue
                if job is None:
                    self._wake.wait(self.poll_s)
                    self._wake.clear()
                    continue
                self.run_job(job)
        except BaseException as exc:  # never die silently: health shows it and submissions get 503
            self.state, self.error = BROKEN, self.public_error(exc)
            log.exception("chronoedit serve: the worker stopped")
            return
        self.state = STOPPED

    def run_job(self, job: Job) -> None:
        """Run one claimed job to ``done`` or ``failed`` (or back to ``queued`` when the server stops)."""
        try:
            files, timings, settings = self._edit(job)
        except Interrupted:
            self.store.requeue(job.id)
            log.info("chronoedit serve: job %s interrupted by shutdown; it runs again after a restart", job.id)
        except UserError as exc:
            log.warning("chronoedit serve: job %s failed: %s", job.id, one_line(exc))
            self.store.fail(job.id, self.public_error(exc))
        except Exception as exc:  # a bug: logged with its traceback; the worker goes on with the next job
            log.exception("chronoedit serve: job %s failed with an internal error", job.id)
            self.store.fail(job.id, self.public_error(exc))
        else:
            self.store.finish(job.id, files, timings, settings)
        finally:
            self.progress = None
            self.jobs_run += 1

    def _edit(self, job: Job) -> tuple[dict[str, str], dict[str, float], dict[str, Any]]:
        """Enhance (if asked), edit and write one job; its files, timings and settings."""
        t0 = time.perf_counter()
        options = EditOptions.model_validate(job.options)
        edit, plan = build_job(self.runner.spec, self.defaults, options, self.results_dir / job.id, self.limits)
        self.progress = Progress(job.id, 0, edit.num_inference_steps, "enhancing")
        if options.enhance_prompt:
            if self.enhancer is None:
                raise UserError("this server has no prompt enhancer (start it with --prompt-enhancer-base-url)")
            edit = enhance(edit, self.enhancer)
        self.progress.stage = "denoising"
        t1 = time.perf_counter()
        out = self.runner.run(edit, wants_trajectory(edit, plan), on_step=self._on_step)
        t2 = time.perf_counter()
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

    def describe(self) -> dict[str, Any]:
        """The worker's state for ``/v1/health``."""
        return {"state": self.state, "error": self.error, "alive": self.alive, "jobs_run": self.jobs_run}
