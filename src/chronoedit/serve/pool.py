"""``chronoedit serve --devices``: one worker process per device, all taking jobs from the one SQLite queue.

Each worker process (:mod:`.child`, started with multiprocessing's ``spawn``: CUDA-safe) loads its own model on its
device and claims jobs itself; a claim is one transaction, so a job goes to exactly one worker, which the queue
records. The server's :class:`WorkerPool` stands where the in-process :class:`~.worker.Worker` stands for the routes
(same attributes) and runs a supervisor thread that

- reads every worker's status messages (model state, the running job's stage and step, jobs run) for the API;
- notices a worker process that ended without being told to (killed, crashed, out of memory): it puts the job that
  worker was running back in the queue (the attempt counts: a job that kills workers :data:`~.store.MAX_ATTEMPTS`
  times is failed) and starts a replacement, at most ``max_restarts`` times per device; a worker that keeps dying
  stays down and ``/v1/health`` says so. A worker whose model did not load is not restarted (it would fail again);
- deletes old results (``--keep-results-hours``), which the workers leave to it.

:meth:`WorkerPool.stop` stops every worker (a running job is interrupted at its next step and re-queued), ends the
processes that do not stop in time, and waits for each: no worker process outlives the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from ..errors import UserError, one_line
from .child import STOP, WAKE, ChildConfig, child_main, worker_label
from .retention import Retention
from .store import JobStore
from .worker import BROKEN, LOADING, READY, STOPPED, Progress, public_error

log = logging.getLogger("chronoedit.serve")

MAX_RESTARTS = 3  # replacements per device before a worker that keeps dying is left down


def parse_devices(text: str) -> list[str]:
    """``--devices``: a comma-separated list of devices, each checked to exist on this machine (one-line UserError
    otherwise). A device may appear once, but ``cpu`` may repeat (several CPU workers, e.g. for tests)."""
    from ..devices import resolve_device

    names = [name.strip() for name in text.split(",")]
    if not text.strip() or any(not name for name in names):
        raise UserError(f"{{devices}} needs devices separated by commas, e.g. cuda:0,cuda:1; got {text!r}", "devices")
    devices = [resolve_device(name, field="devices") for name in names]
    devices = [f"{name}:0" if name in ("cuda", "xpu") else name for name in devices]  # cuda is cuda:0
    seen: set[str] = set()
    for device in devices:
        if device in seen and device != "cpu":
            raise UserError(f"{{devices}} names {device} twice: give each device once (one worker per device)",
                            "devices")  # fmt: skip
        seen.add(device)
    if len({device.split(":")[0] for device in devices}) > 1:
        raise UserError(f"{{devices}} mixes device types ({text}): give devices of one type", "devices")
    return devices


def fresh_status() -> dict[str, Any]:
    """A worker process's status before its first message: loading its model, nothing run."""
    return {"state": LOADING, "error": None, "jobs_run": 0, "disk_full": False, "progress": None}


@dataclass
class Slot:
    """One device's worker: its current process (replaced when it dies) and what it last reported."""

    index: int
    device: str
    process: Any = None  # a multiprocessing Process, None while down
    conn: Any = None  # the pipe to it
    status: dict[str, Any] = field(default_factory=lambda: fresh_status())  # what its process said last
    jobs_before: int = 0  # jobs run by its earlier processes
    restarts: int = 0
    down: str | None = None  # why it is down for good
    lock: threading.Lock = field(default_factory=threading.Lock)  # sends to its pipe

    @property
    def state(self) -> str:
        return BROKEN if self.down is not None else self.status["state"]

    @property
    def pid(self) -> int | None:
        process = self.process  # read once: the supervisor may drop it meanwhile
        return None if process is None else process.pid

    @property
    def label(self) -> str | None:
        pid = self.pid
        return None if pid is None else worker_label(self.index, pid)

    @property
    def alive(self) -> bool:
        process = self.process
        return process is not None and process.is_alive()

    @property
    def progress(self) -> Progress | None:
        progress = self.status["progress"]
        return None if progress is None else Progress(**progress)

    def send(self, message: str) -> None:
        with self.lock:
            if self.conn is not None:
                with contextlib.suppress(OSError):  # it died: the supervisor sees that
                    self.conn.send(message)


class WorkerPool:
    """Worker processes on ``devices`` over the queue ``store`` (the server's, which holds its lock)."""

    def __init__(self, store: JobStore, config: ChildConfig, devices: list[str], max_restarts: int = MAX_RESTARTS,
                 poll_s: float = 0.2) -> None:  # fmt: skip
        self.store, self.config, self.max_restarts, self.poll_s = store, config, max_restarts, poll_s
        self.defaults, self.enhancer, self.limits = config.defaults, config.enhancer, config.limits
        self.redact = {"<results>": config.results_dir, **(config.redact or {})}
        keep = config.limits.keep_results_hours
        self.retention = Retention(store, config.results_dir, None if keep is None else keep * 3600.0)
        self.slots = [Slot(index, device) for index, device in enumerate(devices)]
        self._disk_full = False
        self._unrequeued: list[tuple[str, bool]] = []  # (label, died) of ended workers whose jobs are not back yet
        self._context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- what the routes use (as on Worker) -----------------------------------------------------------------
    @property
    def spec(self) -> Any:
        """The model every worker runs (each on its own device)."""
        return self.config.spec

    @property
    def alive(self) -> bool:
        return any(slot.alive for slot in self.slots)

    @property
    def accepting(self) -> bool:
        """Whether queued jobs will run: some worker loads or has loaded its model (or is being replaced)."""
        return not self._stopping.is_set() and any(slot.state in (LOADING, READY) for slot in self.slots)

    @property
    def error(self) -> str | None:
        return self.describe()["error"]

    @property
    def disk_full(self) -> bool:
        return self._disk_full or any(slot.status["disk_full"] for slot in self.slots)

    @disk_full.setter
    def disk_full(self, value: bool) -> None:
        self._disk_full = value
        if not value:  # a write succeeded: until a worker says otherwise again
            for slot in self.slots:
                slot.status = slot.status | {"disk_full": False}

    def public_error(self, exc: BaseException) -> str:
        return public_error(exc, self.redact)

    def progress_for(self, job_id: str) -> Progress | None:
        """The progress of ``job_id`` when some worker is running it now."""
        for slot in self.slots:
            progress = slot.progress
            if progress is not None and progress.job_id == job_id:
                return progress
        return None

    def wake(self) -> None:
        """A job was queued: every worker looks now."""
        for slot in self.slots:
            slot.send(WAKE)

    def describe(self) -> dict[str, Any]:
        """The workers together, in the in-process worker's shape (``/v1/health``'s ``worker``): ready when one is,
        an error when none can run jobs; ``down`` says how many are down while others run."""
        states = [slot.state for slot in self.slots]
        state = next((s for s in (READY, LOADING, BROKEN) if s in states), STOPPED)
        errors = [f"{slot.device} (worker {slot.index}): {slot.down or slot.status['error']}" for slot in self.slots
                  if slot.state == BROKEN]  # fmt: skip
        down = sum(1 for slot in self.slots if slot.state not in (LOADING, READY))
        return {"state": state, "error": "; ".join(errors) if state == BROKEN else None, "alive": self.alive,
                "jobs_run": sum(self._jobs_run(slot) for slot in self.slots), "disk_full": self.disk_full,
                "down": f"{down} of {len(self.slots)} workers down" if down and state == READY else None}  # fmt: skip

    def describe_workers(self) -> list[dict[str, Any]]:
        """Every worker: device, pid, alive, state, the job it runs (with its progress), jobs run, restarts."""
        answer = []
        for slot in self.slots:
            progress = slot.progress
            answer.append({
                "index": slot.index, "device": slot.device, "pid": slot.pid,
                "alive": slot.alive, "state": slot.state, "error": slot.down or slot.status["error"],
                "job": None if progress is None else progress.job_id,
                "progress": None if progress is None else {"step": progress.step, "total": progress.total,
                                                           "stage": progress.stage},
                "jobs_run": self._jobs_run(slot), "restarts": slot.restarts,
            })  # fmt: skip
        return answer

    @staticmethod
    def _jobs_run(slot: Slot) -> int:
        return slot.jobs_before + slot.status["jobs_run"]

    # ----- starting and stopping ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start a worker process per device and the supervisor (again, after :meth:`stop`)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        for slot in self.slots:
            slot.down, slot.restarts = None, 0
            self._spawn(slot)
        self._thread = threading.Thread(target=self._supervise, name="chronoedit-workers", daemon=True)
        self._thread.start()

    def _spawn(self, slot: Slot) -> None:
        parent, child = self._context.Pipe()
        spec = dataclasses.replace(self.config.spec, device=slot.device)
        config = dataclasses.replace(self.config, index=slot.index, spec=spec, threads=self._threads(slot))
        process = self._context.Process(target=child_main, args=(config, child), daemon=True,
                                        name=f"chronoedit-worker-{slot.index}")  # fmt: skip
        process.start()
        child.close()
        with slot.lock:
            slot.process, slot.conn = process, parent
        slot.status = fresh_status()
        log.info("chronoedit serve: worker %d started on %s (pid %d)", slot.index, slot.device, process.pid)

    def _threads(self, slot: Slot) -> int | None:
        """Torch threads of ``slot``'s process: the configured number; else CPU workers share the cores (unless
        ``OMP_NUM_THREADS`` says otherwise), and a GPU worker keeps torch's default."""
        if self.config.threads is not None or slot.device != "cpu" or os.environ.get("OMP_NUM_THREADS"):
            return self.config.threads
        return max(1, (os.cpu_count() or 1) // sum(1 for s in self.slots if s.device == "cpu"))

    def stop(self, timeout: float = 300.0) -> None:
        """Stop every worker: running jobs are interrupted at their next step and re-queued; a worker still loading
        its model (nothing to lose) and one not stopped after ``timeout`` s are ended. Returns when all have."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        for slot in self.slots:
            slot.send(STOP)
            if slot.process is not None and slot.status["state"] == LOADING:
                slot.process.terminate()
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            if slot.process is None:
                continue
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                log.error("chronoedit serve: worker %d did not stop in %g s; killing it", slot.index, timeout)
                slot.process.kill()
                slot.process.join()
            self._ended(slot, died=False)
        self._requeue_left()

    # ----- the supervisor -----------------------------------------------------------------------------------
    def _supervise(self) -> None:
        """Until stopped: take in status messages, replace workers that died, delete old results."""
        while not self._stopping.is_set():
            try:
                self._supervise_once()
            except Exception:  # e.g. a replacement could not be started: never let the supervisor die of it
                log.exception("chronoedit serve: supervising the workers failed; trying again")
                self._stopping.wait(5.0)

    def _supervise_once(self) -> None:
        pipes = {slot.conn: slot for slot in self.slots if slot.conn is not None}
        ends = {slot.process.sentinel: slot for slot in self.slots if slot.process is not None}
        ready = wait([*pipes, *ends], timeout=self.poll_s)
        for conn in [c for c in ready if c in pipes]:  # first what a dying worker said last
            self._receive(pipes[conn])
        for sentinel in [s for s in ready if s in ends]:
            if self._stopping.is_set():
                return
            self._died(ends[sentinel])
        self._requeue_left()
        self.retention.maybe_sweep()

    def _receive(self, slot: Slot) -> None:
        """Every status message waiting in ``slot``'s pipe; a closed pipe is dropped."""
        try:
            while slot.conn is not None and slot.conn.poll():
                slot.status = slot.conn.recv()
        except (EOFError, OSError):
            with slot.lock:
                slot.conn.close()
                slot.conn = None

    def _died(self, slot: Slot) -> None:
        """``slot``'s process ended on its own: re-queue its job and start a replacement, within bounds."""
        slot.process.join()
        self._receive(slot)  # what it said last
        code, reported = slot.process.exitcode, slot.state
        self._ended(slot, died=True)
        if reported == BROKEN:  # it said why it stopped (its model did not load): a replacement would fail alike
            slot.down = slot.status["error"] or "the worker stopped"
        elif slot.restarts >= self.max_restarts:
            slot.down = f"the worker process died {slot.restarts + 1} times (last exit code {code}); not restarted"
            log.error("chronoedit serve: worker %d on %s: %s", slot.index, slot.device, slot.down)
        else:
            slot.restarts += 1
            log.warning("chronoedit serve: worker %d on %s died (exit code %s); starting another", slot.index,
                        slot.device, code)  # fmt: skip
            try:
                self._spawn(slot)
            except OSError as exc:  # out of processes or memory: health says so
                slot.down = f"cannot start a worker process: {one_line(exc)}"
                log.error("chronoedit serve: worker %d on %s: %s", slot.index, slot.device, slot.down)

    def _ended(self, slot: Slot, died: bool) -> None:
        """Forget ``slot``'s process (ended and waited for); its running job goes back to the queue."""
        self._receive(slot)
        self._unrequeued.append((slot.label, died))
        slot.jobs_before += slot.status["jobs_run"]
        slot.status = slot.status | {"jobs_run": 0, "progress": None}
        with slot.lock:
            if slot.conn is not None:
                slot.conn.close()
            slot.process, slot.conn = None, None

    def _requeue_left(self) -> None:
        """Put the jobs of ended workers back in the queue (tried again later when the queue refuses now)."""
        while self._unrequeued:
            label, died = self._unrequeued[0]
            try:
                ids = self.store.requeue_worker(label, died=died)
            except sqlite3.Error as exc:
                log.error("chronoedit serve: cannot re-queue the jobs of worker %s: %s", label, one_line(exc))
                return
            if ids:
                log.warning("chronoedit serve: re-queued job(s) %s of worker %s", ", ".join(ids), label)
            self._unrequeued.pop(0)
