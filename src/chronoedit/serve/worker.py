"""The one worker that owns the model: loads it once, then runs queued jobs in order, one at a time.

Progress of the running job is kept in memory (it changes every step and is worthless after a restart); states are in
the store. A job whose outputs cannot be produced is marked failed with its error as one line; the worker goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..commands import edit as edit_cmd
from ..runner import EditRunner
from .editing import build_job, output_names
from .options import EditOptions, Limits
from .store import Job, JobStore

log = logging.getLogger("chronoedit.serve")

LOADING, READY, BROKEN, STOPPED = "loading", "ready", "error", "stopped"


@dataclass
class Progress:
    """The running job's denoising progress."""

    job_id: str
    step: int
    total: int


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class Worker:
    """A daemon thread: ``start()`` loads the model, then jobs run until ``stop()``."""

    def __init__(self, store: JobStore, runner: EditRunner, base_args: argparse.Namespace, results_dir: Path,
                 limits: Limits, poll_s: float = 0.5) -> None:  # fmt: skip
        self.store, self.runner, self.base_args = store, runner, base_args
        self.results_dir, self.limits, self.poll_s = results_dir, limits, poll_s
        self.state = LOADING
        self.error: str | None = None
        self.progress: Progress | None = None
        self.jobs_run = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="chronoedit-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A job was queued: look now instead of at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the running job (waits at most ``timeout`` s; a job cut short is re-queued on restart)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        try:
            self.runner.load()
        except Exception as exc:  # the server stays up to say why (health shows the error)
            self.state, self.error = BROKEN, one_line(exc)
            log.error("chronoedit serve: the model did not load: %s", self.error)
            return
        self.state = READY
        while not self._stop.is_set():
            job = self.store.claim_next()
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            self.run_job(job)
        self.state = STOPPED

    def run_job(self, job: Job) -> None:
        """Run one claimed job to ``done`` or ``failed``."""
        t0 = time.perf_counter()
        job_dir = self.results_dir / job.id
        try:
            options = EditOptions.model_validate(job.options)
            edit_job = build_job(self.base_args, options, job_dir, self.limits)
            self.progress = Progress(job.id, 0, edit_job.num_inference_steps)
            t1 = time.perf_counter()
            out = self.runner.run(edit_job, on_step=self._on_step)
            t2 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # edit's "wrote ..." lines
                edit_cmd.write_outputs(edit_job, out)
            t3 = time.perf_counter()
        except Exception as exc:
            log.warning("chronoedit serve: job %s failed: %s", job.id, one_line(exc))
            self.store.fail(job.id, one_line(exc))
        else:
            timings = {"prepare_s": t1 - t0, "generate_s": t2 - t1, "write_s": t3 - t2, "total_s": t3 - t0}
            self.store.finish(job.id, output_names(options), {k: round(v, 4) for k, v in timings.items()})
        finally:
            self.progress = None
            self.jobs_run += 1

    def _on_step(self, step: int, total: int) -> None:
        if self.progress is not None:
            self.progress.step, self.progress.total = step, total

    def describe(self) -> dict[str, Any]:
        """The worker's state for ``/v1/health``."""
        return {"state": self.state, "error": self.error, "alive": self.alive, "jobs_run": self.jobs_run}
