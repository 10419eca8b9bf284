"""One worker process of ``chronoedit serve --devices``: its own model on its own device, jobs from the shared queue.

The process runs the same :class:`~.worker.Worker` loop as the in-process worker thread, in its main thread, on its
own connection to the queue (claims are single ``BEGIN IMMEDIATE`` transactions, so each job goes to one worker).
Everything its server shows that is not in the queue (the model's state, the running job's stage and step, the count
of jobs run) goes to the server over a pipe as a small status message at every change. The server sends ``wake``
(a job was queued) and ``stop``; when the pipe closes (the server died) the worker stops as on ``stop``: its running
job is interrupted at the next step and re-queued.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..editing import EditRunner, EditSettings, ModelSpec, Report
from .options import Limits
from .store import JobStore
from .worker import Worker

log = logging.getLogger("chronoedit.serve")

WAKE, STOP = "wake", "stop"


@dataclass(frozen=True)
class ChildConfig:
    """What a worker process needs (picklable: it crosses to a spawned process)."""

    index: int  # the worker's slot in the server (0, 1, ...)
    spec: ModelSpec  # its device set
    db_path: Path
    defaults: EditSettings
    results_dir: Path
    limits: Limits
    enhancer: Any = None
    redact: dict[str, Path] | None = None
    threads: int | None = None  # torch threads (None: torch's default, e.g. from OMP_NUM_THREADS)
    poll_s: float = 0.5


def worker_label(index: int, pid: int) -> str:
    """The name a worker process claims jobs under in the queue (``slot@pid``: unique across restarts)."""
    return f"{index}@{pid}"


class ProcessWorker(Worker):
    """The worker loop of a worker process: every change is sent to the server as a status message."""

    def __init__(self, conn: Connection, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = conn

    def _changed(self) -> None:
        progress = self.progress
        status = {"state": self.state, "error": self.error, "jobs_run": self.jobs_run, "disk_full": self.disk_full,
                  "progress": None if progress is None else dataclasses.asdict(progress)}  # fmt: skip
        try:
            self.conn.send(status)
        except (OSError, ValueError):  # the server is gone: end now (see _listen)
            os._exit(3)


def _listen(conn: Connection, worker: Worker) -> None:
    """The server's messages: ``wake`` wakes the loop; ``stop`` stops it. The pipe closing means the server died: this
    process ends at once, writing nothing more (a restarted server has queued its job again for another worker)."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(3)
        if message == WAKE:
            worker.wake()
        else:
            worker.request_stop()
            return


def _note(message: str) -> None:
    print(f"chronoedit: note: {message}", file=sys.stderr, flush=True)


def child_main(config: ChildConfig, conn: Connection) -> None:
    """The body of a worker process (the target of a spawned ``multiprocessing.Process``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so does a service manager's SIGTERM (systemd's control group)
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    store = JobStore(config.db_path, owner=False)
    runner = EditRunner(config.spec, report=Report(note=_note))
    worker = ProcessWorker(conn, store, runner, config.defaults, config.results_dir, config.limits,
                           enhancer=config.enhancer, redact=config.redact, poll_s=config.poll_s,
                           label=worker_label(config.index, os.getpid()), sweep=False)  # fmt: skip
    threading.Thread(target=_listen, args=(conn, worker), name="chronoedit-worker-pipe", daemon=True).start()
    try:
        worker._main()
    finally:
        store.close()
        conn.close()
