"""One edit over the ranks of a ``torchrun`` launch (context parallelism) at the application layer: the layout,
checked before anything loads; the process group around the run; what each rank reports (only rank 0 speaks and
writes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..devices import resolve_device
from ..errors import RankError, UserError
from ..parallel import SINGLE, Layout, Ranks, choose_layout, from_env
from ..parallel import ranks as process_group
from .settings import DEMO, ModelSpec

LAUNCH_HINT = "launch with torchrun --nproc_per_node=N -m chronoedit ..."


def resolve_layout(
    model_path: str,
    transformer: Path | None,
    context_parallel: bool | None,
    ulysses_degree: int | None = None,
    ring_degree: int | None = None,
    cfg_parallel: bool = False,
) -> Layout | None:
    """The layout of a context-parallel run over this launch's ranks (None: one process, or not asked for), checked
    against the model's head count (read from the checkpoint's config, nothing loaded). ``context_parallel``: None
    for "whenever there are several ranks" (``edit``), True or False as asked (``batch``). UserError for parallel
    options without several processes (or without context parallel), or a layout that cannot run."""
    ranks = from_env()
    asked = [name for name, value in (("context_parallel", context_parallel is True), ("cfg_parallel", cfg_parallel),
                                      ("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)) if value]
    if not ranks.distributed or context_parallel is False:
        if asked:
            where = "several processes" if not ranks.distributed else "{context_parallel}"
            raise UserError(f"{{{asked[0]}}} needs {where}: {LAUNCH_HINT}", asked[0], ("context_parallel",))
        return None
    return choose_layout(ranks.world, model_heads(model_path, transformer), cfg_parallel, ulysses_degree, ring_degree)


def model_heads(model_path: str, transformer: Path | None) -> int:
    """The transformer's attention heads, from its config (or its shapes), without loading a weight."""
    from ..loading import transformer_source

    if transformer is not None:
        return transformer_source(transformer).config.num_attention_heads
    if model_path == DEMO:
        from ..demo import DEMO_SPEC

        return DEMO_SPEC.num_attention_heads
    return transformer_source(model_path, "transformer").config.num_attention_heads


@contextlib.contextmanager
def ranks_of(spec: ModelSpec) -> Iterator[Ranks]:
    """This process's ranks in a ``torchrun`` launch, with the default process group started here (gloo on the CPU,
    NCCL on CUDA) unless one runs, and ended on the way out if started here; one process (no group) otherwise.

    The demo checkpoint is built before the group starts: under a process group transformers writes weights on
    rank 0 only, so a demo built by another rank would lack them."""
    ranks = from_env()
    if not ranks.distributed:
        yield SINGLE
        return
    if spec.is_demo:
        from ..demo import ensure_demo_checkpoint

        ensure_demo_checkpoint()
    started = process_group.init(ranks, spec.device)
    try:
        yield ranks
    finally:
        if started:
            process_group.shutdown()


def rank_device(device: str, layout: Layout | None) -> str:
    """The device this rank runs on (``cuda`` -> ``cuda:<local rank>`` with a layout; each data-parallel rank maps it
    itself), checked on this machine. UserError for one GPU named for every process; RankError for a rank whose
    device this machine lacks."""
    ranks = from_env()
    if ranks.distributed and ":" in device and not device.startswith("cpu"):
        raise UserError(f"{{device}} {device} would put all {ranks.world} processes on one device: give "
                        f"{device.split(':')[0]} (each process takes its local rank's)", "device")  # fmt: skip
    if layout is None or not ranks.distributed:
        return device
    try:
        return resolve_device(ranks.device(device))
    except UserError as exc:
        raise RankError(f"rank {ranks.rank}: {exc.template}", exc.field) from None

