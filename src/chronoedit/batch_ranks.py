"""A batch over the processes of one ``torchrun`` (data parallel): each rank loads its own model on its own device and
takes the pending rows one at a time, so every row is run by exactly one rank.

How the N ranks share one output folder:

1. Every rank reads and checks the manifest and the flags (the same on every rank: errors are one line, exit 2, before
   the process group starts and before any model loads).
2. Rank 0 takes the folder's lock (:func:`chronoedit.batch.batch_lock`: another batch on the folder is refused),
   removes what a killed batch left (temp files, an old ticket file), lists the pending rows and writes a fresh ticket
   file; then it tells every rank the outcome (the pending rows and this run's id, or the error that stops all ranks).
   Every rank holds the folder's ranks lock shared until it ends, so while any rank of this run lives (even after rank
   0 died) no other batch takes the folder.
3. Each rank loads its model; after a barrier, each takes the next pending row from the ticket file (a counter advanced
   under an flock) when it is free, until none is left. Dealing rows one at a time balances rows of unequal cost
   (sizes, steps, reasoning) over the ranks, which a fixed split of the rows cannot; a row is never taken twice in a
   run, failed rows included. A rank that dies takes its row with it: the row has no sidecar and the next run (any
   number of ranks) does it, like every row not done.
4. The counts are summed over the ranks; every rank returns the same summary (exit code 1 everywhere if a row failed
   anywhere). Rank 0 shows the progress bar.

With ``--context-parallel`` (the model's layout set: :attr:`chronoedit.editing.ModelSpec.layout`) the ranks run
every row together instead, each row's token sequence split over them, and rank 0 alone writes and counts
(:func:`_assignment`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from . import files
from .batch import (
    LOCK_NAME,
    RANKS_LOCK_NAME,
    TICKETS_NAME,
    Batch,
    Row,
    Summary,
    busy_message,
    prepare,
    progress_bar,
    run_rows,
    start_folder,
)
from .editing import EditRunner, ModelSpec
from .editing.parallel import ranks_of
from .errors import RankError, UserError
from .parallel.ranks import Ranks

MakeRunner = Callable[[ModelSpec], EditRunner]


class Tickets:
    """The next pending row of one multi-process run and the count of finished rows: two numbers in a small file,
    read and advanced under an exclusive flock (rewritten in place at a fixed width, so the lock stays on the file)."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.path, self.run_id = path, run_id

    def _text(self, taken: int, finished: int) -> bytes:
        return f"{self.run_id} {taken:012d} {finished:012d}\n".encode()

    def create(self) -> Tickets:
        """Write a fresh ticket file (row 0 next, none finished); call while holding the folder's lock."""
        self.path.write_bytes(self._text(0, 0))
        return self

    def take(self) -> int:
        """The index of the next pending row for this rank (it may be past the last row: then none is left)."""
        return self._advance(take=1)[0]

    def finish(self, count: int = 1) -> int:
        """Count ``count`` finished rows (0: just look); returns the count of rows finished by all ranks so far."""
        return self._advance(finish=count)[1]

    def _advance(self, take: int = 0, finish: int = 0) -> tuple[int, int]:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            raise UserError(f"{self.path} vanished: the output folder must be shared by every rank") from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)  # released with the descriptor, or by the OS when the rank dies
            words = os.pread(fd, 200, 0).decode().split()
            if len(words) != 3 or words[0] != self.run_id:
                raise UserError(f"{self.path} belongs to another batch: the output folder was taken over mid-run")
            taken, finished = int(words[1]), int(words[2])
            os.pwrite(fd, self._text(taken + take, finished + finish), 0)
            return taken, finished + finish
        finally:
            os.close(fd)


def run_batch_ranks(batch: Batch, ranks: Ranks, make_runner: MakeRunner = EditRunner, quiet: bool = False,
                    announce: Callable[[Summary], None] | None = None) -> Summary:  # fmt: skip
    """Run the batch's pending rows over the ranks of this ``torchrun`` (this process is ``ranks.rank``); the summary
    of all ranks together, the same on every rank. ``announce`` is called with it on rank 0 while every rank still
    waits (torchrun stops the other ranks as soon as one exits with an error code: the summary must be out first).
    Starts the process group (if none runs) and always ends what it started. A bad manifest raises ManifestError on
    every rank before the process group starts."""
    import torch.distributed as dist

    rows = prepare(batch)
    with ranks_of(batch.model):  # the demo model built first, then the process group
        summary = _run(batch, ranks, rows, make_runner, quiet)
        if announce is not None and ranks.is_main:
            announce(summary)
        dist.barrier()
        return summary


def _run(batch: Batch, ranks: Ranks, rows: list[Row], make_runner: MakeRunner, quiet: bool) -> Summary:
    """The run once the process group is up; a user error one rank meets alone after the start (its device, a full
    disk) is raised there as a :class:`RankError`, which every rank says (not only rank 0)."""
    with contextlib.ExitStack() as held:
        plan = _shared_start(batch, ranks, rows, held)
        try:
            return _run_started(batch, ranks, rows, make_runner, quiet, plan)
        except UserError as exc:
            if ranks.is_main or isinstance(exc, RankError):
                raise
            also = exc.fields[1:] if exc.field else exc.fields
            raise RankError(f"rank {ranks.rank}: {exc.template}", exc.field, also) from exc


def _run_started(batch: Batch, ranks: Ranks, rows: list[Row], make_runner: MakeRunner, quiet: bool,
                 plan: dict[str, Any]) -> Summary:  # fmt: skip
    """Load, run this rank's rows and sum the counts (the folder is locked and cleaned: ``plan`` says what to do)."""
    import torch.distributed as dist

    by_id = {row.id: row for row in rows}
    pending = [by_id[row_id] for row_id in plan["pending"]]
    device = ranks.device(batch.model.device)
    mine = dataclasses.replace(batch, run_id=plan["run_id"], worker=f"rank {ranks.rank} of {ranks.world}",
                               model=dataclasses.replace(batch.model, device=device))  # fmt: skip
    runner = make_runner(mine.model)
    summary = Summary(skipped=plan["skipped"])
    if pending:
        t_load = time.perf_counter()
        runner.load()
        summary.model_load_s = time.perf_counter() - t_load
        dist.barrier()  # every model loaded before the first row is dealt: no rank takes all rows while others load
    tickets = Tickets(batch.out_dir / TICKETS_NAME, plan["run_id"])
    bar = progress_bar(len(rows), plan["skipped"], quiet or not ranks.is_main)
    together = batch.model.layout is not None
    with bar:
        rows_here, writes = _assignment(pending, tickets, ranks, together)

        def advance() -> None:
            finished = tickets.finish()
            bar.update(plan["skipped"] + finished - bar.n)

        run_rows(mine, rows_here, runner, summary, bar, writes=writes, advance=None if together else advance,
                 lockstep=together)
        if not together:
            _wait_for_the_others(tickets, len(pending))
        total = _summed(summary, together)
        bar.update(total.done + total.failed + total.skipped - bar.n)
    if ranks.is_main:
        with contextlib.suppress(FileNotFoundError):
            tickets.path.unlink()  # every rank is past its last row (the gather above)
    return total


def _wait_for_the_others(tickets: Tickets, rows: int, poll_s: float = 1.0) -> None:
    """Wait, without a collective, until every rank has finished its last row: a rank out of rows may wait longer
    than the process group's timeout for another rank's long row. (A rank that dies ends the launch: torchrun stops
    the others.)"""
    while tickets.finish(0) < rows:
        time.sleep(poll_s)


def _assignment(pending: list[Row], tickets: Tickets, ranks: Ranks, together: bool) -> tuple[Iterator[Row], bool]:
    """The rows this rank runs and whether it writes them: data parallel, the next pending row whenever this rank is
    free, written by this rank; ``together`` (context parallel): every pending row, in order, written by rank 0."""
    if together:
        return iter(pending), ranks.is_main

    def dealt() -> Iterator[Row]:
        while (index := tickets.take()) < len(pending):
            yield pending[index]

    return dealt(), True


def _shared_start(batch: Batch, ranks: Ranks, rows: list[Row], held: contextlib.ExitStack) -> dict[str, Any]:
    """Rank 0 locks and cleans the folder and lists the pending rows; every rank gets the plan (``run_id``,
    ``pending`` ids, ``skipped``) and holds the ranks lock shared (in ``held``). A UserError on rank 0 (the folder is
    busy) is raised on every rank; any other error on rank 0 raises it there and a UserError on the others."""
    import torch.distributed as dist

    plan: dict[str, Any] = {"error": "rank 0 stopped with an error"}
    failure: BaseException | None = None
    if ranks.is_main:
        try:
            ranks_lock = _lock_for_ranks(batch.out_dir, held)
            pending, skipped = start_folder(batch, rows)
            Tickets(batch.out_dir / TICKETS_NAME, batch.run_id).create()
            plan = {"error": None, "run_id": batch.run_id, "pending": [row.id for row in pending], "skipped": skipped}
            _share(ranks_lock)  # the other ranks may take it shared now; the folder lock stays exclusive
        except BaseException as exc:
            failure = exc
            if isinstance(exc, UserError):
                plan = {"error": str(exc)}
    box = [plan]
    dist.broadcast_object_list(box, src=0)
    plan = box[0]
    if failure is not None:
        raise failure
    if plan["error"] is not None:
        raise UserError(plan["error"])
    if not ranks.is_main:
        held.enter_context(_shared_ranks_lock(batch.out_dir))
    return plan


def _lock_for_ranks(out_dir: Path, held: contextlib.ExitStack) -> IO[str]:
    """Rank 0's locks, taken as a one-process batch takes them (:func:`chronoedit.batch.batch_lock`): the folder's
    lock and its ranks lock, both exclusive (busy: UserError). Returns the ranks lock's handle, for :func:`_share`."""
    busy = busy_message(out_dir)
    held.callback(files.hold_lock(out_dir / LOCK_NAME, busy).close)
    ranks_lock = files.hold_lock(out_dir / RANKS_LOCK_NAME, busy)
    held.callback(ranks_lock.close)
    return ranks_lock


def _share(handle: IO[str]) -> None:
    """Turn rank 0's exclusive ranks lock into a shared one, so the other ranks can share it. Not atomic (flock drops,
    then takes), which is safe: rank 0 still holds the folder's lock, which every batch takes first."""
    with contextlib.suppress(ImportError):
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)


@contextlib.contextmanager
def _shared_ranks_lock(out_dir: Path) -> Iterator[None]:
    """The folder's ranks lock, shared (every rank of the run holds it until it ends)."""
    with open(out_dir / RANKS_LOCK_NAME, "a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: nothing is locked (as files.hold_lock)
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise UserError(busy_message(out_dir)) from None
        yield


def _summed(summary: Summary, together: bool = False) -> Summary:
    """This rank's counts summed with every other rank's (the rows already done counted once); ``together``: rank
    0's counts (every rank ran every row)."""
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (summary.done, summary.failed, summary.failures, summary.model_load_s))
    if together:
        parts = parts[:1]
    total = Summary(skipped=summary.skipped)
    for done, failed, failures, load_s in parts:
        total.done, total.failed = total.done + done, total.failed + failed
        total.failures += failures
        if load_s is not None:
            total.model_load_s = max(total.model_load_s or 0.0, load_s)
    return total
