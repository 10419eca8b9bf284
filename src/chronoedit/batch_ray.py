"""A batch on a Ray cluster (``chronoedit batch ... --ray ADDRESS|auto|local --workers K``).

The driver (this process) holds the output folder's lock, cleans what a killed batch left and lists the pending rows,
as a one-process batch does (:mod:`chronoedit.batch`). It then starts K actors (:class:`RowWorker`), each loading the
model once, and hands the next pending row to whichever actor is free (``ray.wait``). Actors write each row's image and
sidecar into the output folder themselves (atomically: the folder must be shared by every node), so the outputs,
sidecars and resume rules are exactly a one-process batch's. An actor that dies (its node lost, killed, out of host
memory) is replaced, and its row runs again elsewhere, unless it had already written it; a row that kills two actors
is recorded as failed; after more than ``max_deaths`` deaths the batch gives up in one line (rerun to resume).

Ray is optional (``pip install 'chronoedit[ray]'``) and imported only here, when a Ray batch runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import files
from .batch import (
    Batch,
    Row,
    Summary,
    batch_lock,
    error_path,
    is_done,
    output_format,
    prepare,
    progress_bar,
    run_row_recorded,
    start_folder,
)
from .editing import EditRunner
from .errors import UserError

RAY_HINT = "pip install 'chronoedit[ray]'"
ROW_DEATHS = 2  # a row whose run killed this many actors is recorded as failed instead of run again
OnDispatch = Callable[[Row, int], None]  # (the row, the pid of the actor it was sent to)


def import_ray() -> Any:
    """The ``ray`` module; UserError naming the extra to install when it is missing."""
    try:
        import ray
    except ImportError:
        raise UserError(f"{{ray}} needs Ray, which is not installed: {RAY_HINT}", "ray") from None
    return ray


@dataclass(frozen=True)
class Cluster:
    """Where and how wide a Ray batch runs: ``address`` (a cluster's address, ``auto`` for the one this machine
    belongs to, ``local`` for a Ray instance started in this process and stopped at the end), ``workers`` actors with
    ``gpus_per_worker`` GPUs each (0: CPU actors), and how many actor deaths to survive (default: 2 per worker)."""

    address: str
    workers: int
    gpus_per_worker: float = 0.0
    max_deaths: int | None = None

    @property
    def death_limit(self) -> int:
        return self.max_deaths if self.max_deaths is not None else 2 * self.workers


class RowWorker:
    """One actor's work: the batch's model, loaded once by :meth:`start`; :meth:`run` runs and writes one row."""

    def __init__(self, batch: Batch) -> None:
        self.batch = dataclasses.replace(batch, worker=f"ray {os.getpid()}@{socket.gethostname()}")
        self.runner = EditRunner(batch.model)

    def start(self) -> int:
        """Load the model; returns this actor's process id."""
        self.runner.load()
        return os.getpid()

    def run(self, row: Row) -> str | None:
        """Run and write one row: None when done, else its user error (recorded in its error file)."""
        return run_row_recorded(self.runner, self.batch, row)


def run_batch_ray(batch: Batch, cluster: Cluster, quiet: bool = False,
                  on_dispatch: OnDispatch | None = None) -> Summary:  # fmt: skip
    """Run the batch's pending rows on ``cluster``'s actors; ``on_dispatch`` is called as each row is sent (tests use
    it to kill an actor mid-run). Raises UserError for a missing Ray, an unreachable cluster, a busy folder or too
    many actor deaths."""
    ray = import_ray()
    batch = absolute(batch)
    rows = prepare(batch)
    with batch_lock(batch.out_dir):
        pending, skipped = start_folder(batch, rows)
        summary = Summary(skipped=skipped)
        if not pending:
            return summary
        with connected(ray, cluster), progress_bar(len(rows), skipped, quiet) as bar:
            _Scheduler(ray, batch, cluster, summary, bar, on_dispatch).run(pending)
    return summary


def absolute(batch: Batch) -> Batch:
    """The batch with every path absolute: actors run in their own working folders (on other machines too)."""
    spec = batch.model
    local = spec.local_folder
    spec = dataclasses.replace(
        spec,
        model_path=str(local.absolute()) if local is not None else spec.model_path,
        transformer=spec.transformer.absolute() if spec.transformer is not None else None,
        loras=tuple(dataclasses.replace(lora, path=lora.path.absolute()) for lora in spec.loras),
    )
    return dataclasses.replace(batch, manifest=batch.manifest.absolute(), out_dir=batch.out_dir.absolute(), model=spec)


@contextlib.contextmanager
def connected(ray: Any, cluster: Cluster) -> Iterator[None]:
    """A Ray session for the batch: the one this process already runs (left running; a notebook's, a test's), else a
    new connection (or a local instance) ended at the end. A ``host:port`` that takes no connection is a UserError
    at once."""
    try:
        _check_reachable(cluster.address)
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray cluster at {cluster.address}: {exc}") from None
    if ray.is_initialized():
        yield
        return
    common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if cluster.address == "local":
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local instance of ours reports nowhere
            ray.init(num_cpus=max(cluster.workers, os.cpu_count() or 1), **common)
        else:
            ray.init(address=cluster.address, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot reach the Ray cluster at {cluster.address}: {' '.join(str(exc).split())}") from exc
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """ConnectionError at once when ``host:port`` (or ``ray://host:port``) takes no TCP connection: Ray itself would
    retry for minutes."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise ConnectionError(f"no answer at {host}:{port} ({exc.strerror or exc})") from None


class _Scheduler:
    """Rows to free actors, one at a time; dead actors replaced and their rows run again."""

    def __init__(self, ray: Any, batch: Batch, cluster: Cluster, summary: Summary, bar: Any,
                 on_dispatch: OnDispatch | None) -> None:  # fmt: skip
        self.ray, self.batch, self.cluster, self.summary, self.bar = ray, batch, cluster, summary, bar
        self.on_dispatch = on_dispatch
        self.actor_class = ray.remote(num_cpus=1, num_gpus=cluster.gpus_per_worker)(RowWorker)
        self.starting: dict[Any, Any] = {}  # start() ref -> actor
        self.idle: list[tuple[Any, int]] = []  # (actor, pid)
        self.running: dict[Any, tuple[Any, int, Row]] = {}  # run() ref -> (actor, pid, row)
        self.deaths, self.row_deaths = 0, Counter[str]()

    def run(self, pending: list[Row]) -> None:
        queue = deque(pending)
        for _ in range(min(self.cluster.workers, len(pending))):
            self._start_actor()
        try:
            while queue or self.running:
                while queue and self.idle:
                    self._dispatch(queue.popleft())
                ready, _ = self.ray.wait([*self.running, *self.starting], num_returns=1)
                if ready[0] in self.starting:
                    self._started(ready[0])
                else:
                    self._finished(ready[0], queue)
        finally:
            for actor in self._actors():
                self.ray.kill(actor)

    def _actors(self) -> list[Any]:
        """Every actor this scheduler started that is not known dead."""
        return [*self.starting.values(), *(a for a, _ in self.idle), *(a for a, _, _ in self.running.values())]

    def _start_actor(self) -> None:
        actor = self.actor_class.remote(self.batch)
        self.starting[actor.start.remote()] = actor

    def _started(self, ref: Any) -> None:
        actor = self.starting.pop(ref)
        try:
            pid = self._get(ref)
        except self.ray.exceptions.RayActorError as exc:
            self._died(exc, "while loading the model")
            self._start_actor()
            return
        except BaseException:  # the batch ends: this actor is in no list the cleanup sees
            self.ray.kill(actor)
            raise
        self.idle.append((actor, pid))

    def _dispatch(self, row: Row) -> None:
        actor, pid = self.idle.pop()
        self.running[actor.run.remote(row)] = (actor, pid, row)
        self.bar.set_postfix_str(row.id)
        if self.on_dispatch is not None:
            self.on_dispatch(row, pid)

    def _finished(self, ref: Any, queue: deque[Row]) -> None:
        actor, pid, row = self.running.pop(ref)
        try:
            message = self._get(ref)
        except self.ray.exceptions.RayActorError as exc:
            self._died(exc, f"running row {row.id}")
            self._rerun(row, queue)
            if queue:  # a replacement only when rows are left for it
                self._start_actor()
            return
        except BaseException:  # the batch ends: this actor is in no list the cleanup sees
            self.ray.kill(actor)
            raise
        self.idle.append((actor, pid))
        self._count(row, message)

    def _get(self, ref: Any) -> Any:
        """The task's result; a user error raised in an actor (a full disk, a broken checkpoint) raised here as
        itself, anything else in an actor is a bug and raised as Ray gives it."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):
                raise exc.cause from None
            raise

    def _died(self, exc: BaseException, doing: str) -> None:
        self.deaths += 1
        if self.deaths > self.cluster.death_limit:
            raise UserError(f"{self.deaths} Ray worker deaths, more than the {self.cluster.death_limit} allowed (the "
                            f"last {doing}: {type(exc).__name__}): giving up; rerun the batch to resume")  # fmt: skip

    def _rerun(self, row: Row, queue: deque[Row]) -> None:
        """A row whose actor died: done if it was written before the death, else run again first (recorded as failed
        when it has killed ``ROW_DEATHS`` actors). Its dead writer's temp files go."""
        fmt = _format(self.batch, row)
        for path in self.batch.out_dir.glob(f"{row.id}.*"):
            if files.is_temp_name(path.name) and path.name.startswith((f"{row.id}.json.", f"{row.id}.{fmt}.")):
                path.unlink(missing_ok=True)
        if fmt is not None and is_done(self.batch.out_dir, row.id, fmt):
            self._count(row, None)
            return
        self.row_deaths[row.id] += 1
        if self.row_deaths[row.id] < ROW_DEATHS:
            queue.appendleft(row)
            return
        message = f"its Ray worker died {ROW_DEATHS} times while running it (out of memory?)"
        record = error_path(self.batch.out_dir, row.id)
        with files.writing(record):
            files.write_json(record, {
                "id": row.id, "manifest_line": row.line, "input": str(row.input.absolute()), "error": message,
                "error_type": "WorkerDied", "run_id": self.batch.run_id,
            })  # fmt: skip
        self._count(row, message)

    def _count(self, row: Row, message: str | None) -> None:
        if message is None:
            self.summary.done += 1
        else:
            self.summary.failed += 1
            self.summary.failures.append(f"{row.id}: {message}")
            self.bar.write(f"chronoedit: row {row.id} (line {row.line}) failed: {message}", file=sys.stderr)
        self.bar.update(1)


def _format(batch: Batch, row: Row) -> str | None:
    with contextlib.suppress(UserError):
        return output_format(row, batch.output_format)
    return None
