"""The processes of one multi-process run (``torchrun``): who am I, which device is mine, the process group.

``torchrun --nproc_per_node=N -m chronoedit ...`` starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and a rendezvous (``MASTER_ADDR``/``MASTER_PORT``) in their environment. :func:`from_env` reads them;
:func:`init` starts the default process group (NCCL for CUDA devices, gloo otherwise) unless one is already running.
The one place that maps a rank to its device: :meth:`Ranks.device`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from ..errors import UserError

TIMEOUT = datetime.timedelta(minutes=30)  # a rank that waits longer at a collective than this is stuck, not slow


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The rank that shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device(self, device: str) -> str:
        """This rank's device for a run on ``device``: ``cuda`` -> ``cuda:<local rank>`` (also ``xpu``), a device
        with an index or the CPU as given."""
        if self.distributed and device in ("cuda", "xpu"):
            return f"{device}:{self.local_rank}"
        return device


SINGLE = Ranks()


def from_env() -> Ranks:
    """The ranks torchrun (or any launcher setting ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) gave this process; one
    process when the variables are absent. UserError for values that make no sense."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    raw = {name: os.environ.get(name) for name in names}
    if raw["WORLD_SIZE"] is None:
        return SINGLE
    try:
        world = int(raw["WORLD_SIZE"])
        rank = int(raw["RANK"] or 0)
        local = int(raw["LOCAL_RANK"] if raw["LOCAL_RANK"] is not None else rank)
    except ValueError:
        shown = ", ".join(f"{name}={value}" for name, value in raw.items() if value is not None)
        raise UserError(f"the launcher's environment is not a set of ranks: {shown}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UserError(f"the launcher's environment is not a set of ranks: RANK={rank} of WORLD_SIZE={world}")
    return Ranks(rank=rank, world=world, local_rank=local)


def backend_for(device: str) -> str:
    """NCCL for CUDA devices, gloo for the CPU (and anything else)."""
    return "nccl" if device.startswith("cuda") else "gloo"


def init(ranks: Ranks, device: str) -> bool:
    """Start the default process group for ``ranks`` on ``device``'s backend unless one runs or the run is one
    process. Returns whether this call started it (then the caller ends it with :func:`shutdown`)."""
    import torch.distributed as dist

    if not ranks.distributed or dist.is_initialized():
        return False
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(ranks.device("cuda"))
    dist.init_process_group(backend_for(device), rank=ranks.rank, world_size=ranks.world, timeout=TIMEOUT)
    return True


def current() -> Ranks:
    """The ranks of the running default process group (one process when none runs)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


def shutdown() -> None:
    """End the default process group (no-op when none runs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
