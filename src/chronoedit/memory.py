"""Where components live: on the compute device only while they work, when memory is short.

Two switches: encoders (UMT5, CLIP) are by default moved to the compute device to encode and sent back to the CPU
before denoising; with model offload the transformer and VAE get the same treatment (the original's --offload_model).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .streaming import is_streamed

CPU = torch.device("cpu")


def free_device_cache(device: torch.device) -> None:
    """Return cached blocks to the driver so the next component has the room."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def module_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of a module's parameters and buffers."""
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


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
        if any(p.device.type == "cuda" for p in module.parameters()):
            module.to(CPU)
            free_device_cache(device)


@contextmanager
def resident(module: torch.nn.Module | None, device: torch.device, offload: bool) -> Iterator[None]:
    """Put ``module`` on ``device`` for the block; with ``offload`` send it back to the CPU afterwards. A module whose
    blocks are streamed (:mod:`chronoedit.streaming`) is left where it is: its blocks come and go by themselves."""
    if module is None or is_streamed(module):
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        if offload and device != CPU:
            module.to(CPU)
            free_device_cache(device)
