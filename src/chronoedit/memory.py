"""Where components live: on the compute device only while they work, when memory is short.

Two switches: encoders (UMT5, CLIP) are by default moved to the compute device to encode and sent back to the CPU
before denoising; with model offload the transformer and VAE get the same treatment (the original's --offload_model).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .lazy import LazyComponent
from .streaming import is_streamed

CPU = torch.device("cpu")


def free_device_cache(device: torch.device) -> None:
    """Return cached blocks to the driver so the next component has the room."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def module_bytes(module: torch.nn.Module | LazyComponent | None) -> int:
    """Bytes of a module's parameters and buffers (a lazy component's estimate)."""
    if module is None:
        return 0
    if isinstance(module, LazyComponent):
        return module.nbytes
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def available_host_bytes() -> int | None:
    """Memory the OS can give this process now (Linux ``MemAvailable``); None where it cannot tell."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


LOW_MEMORY_SHARE = 0.85  # components above this share of the available memory: one at a time


def memory_is_short(component_bytes: int, available: int | None) -> bool:
    """Whether loading every component at once would take more than :data:`LOW_MEMORY_SHARE` of ``available``."""
    return available is not None and component_bytes > LOW_MEMORY_SHARE * available


def make_room(device: torch.device, needed: int, evictable: list[torch.nn.Module]) -> None:
    """On CUDA, send ``evictable`` modules (in order) back to the CPU until ``needed`` bytes are free.

    Lets a 48 GB card that holds the transformer between calls still fit UMT5 for the next call's encoding.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    margin = 1.25  # activations and allocator slack
    for module in evictable:
        if torch.cuda.mem_get_info(device)[0] >= needed * margin:
            return
        if not isinstance(module, torch.nn.Module):  # a low-memory stand-in holds nothing between its stages
            continue
        if any(p.device.type == "cuda" for p in module.parameters()):
            module.to(CPU)
            free_device_cache(device)


@contextmanager
def resident(
    component: torch.nn.Module | LazyComponent | None, device: torch.device, offload: bool
) -> Iterator[torch.nn.Module | None]:
    """Put the module on ``device`` for the block and yield it; with ``offload`` send it back to the CPU afterwards.
    A :class:`~chronoedit.lazy.LazyComponent` is built for the block and dropped after it (low-memory mode). A module
    whose blocks are streamed (:mod:`chronoedit.streaming`) is left where it is: its blocks come and go by
    themselves."""
    if isinstance(component, LazyComponent):
        try:
            yield component.acquire().to(device)
        finally:
            component.release()  # also when the move failed: nothing stays built
            free_device_cache(device)
        return
    if component is None or is_streamed(component):
        yield component
        return
    component.to(device)
    try:
        yield component
    finally:
        if offload and device != CPU:
            component.to(CPU)
            free_device_cache(device)
