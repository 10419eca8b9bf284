"""Where components live: on the compute device only while they work, when memory is short.

Two switches: encoders (UMT5, CLIP) are by default moved to the compute device to encode and sent back to the CPU
before denoising; with model offload the transformer and VAE get the same treatment (the original's --offload_model).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

CPU = torch.device("cpu")


def free_device_cache(device: torch.device) -> None:
    """Return cached blocks to the driver so the next component has the room."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def resident(module: torch.nn.Module | None, device: torch.device, offload: bool) -> Iterator[None]:
    """Put ``module`` on ``device`` for the block; with ``offload`` send it back to the CPU afterwards."""
    if module is None:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        if offload and device != CPU:
            module.to(CPU)
            free_device_cache(device)
