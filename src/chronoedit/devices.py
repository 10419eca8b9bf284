"""Devices and dtypes by name: the one place that picks a default device and checks that a named one exists."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("bf16", "fp16", "fp32")
COMPUTE_DEVICES = ("cpu", "cuda", "mps", "xpu")  # devices whose tensors hold data (not meta) that chronoedit runs on


def torch_dtype(name: str) -> torch.dtype:
    """``bf16`` / ``fp16`` / ``fp32`` -> the torch dtype; UserError for anything else."""
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise UserError(f"unknown dtype {name!r}: use bf16, fp16 or fp32")
    return table[name]


def resolve_device(name: str | None, field: str = "device", allow_auto: bool = False) -> str:
    """The device to run on: ``name`` checked to exist on this machine, else cuda when available, else cpu.

    ``auto`` (spread a model over every GPU) is accepted when ``allow_auto``. UserError names ``field``.
    """
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if allow_auto and name == "auto":
        if not torch.cuda.is_available():
            raise UserError(f"{{{field}}} auto spreads the model over GPUs, but CUDA is not available (use cpu)",
                            field)  # fmt: skip
        return name
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown {{{field}}} {name!r}", field) from None
    if device.type not in COMPUTE_DEVICES:
        raise UserError(f"{{{field}}} {name}: not a device that can run an edit (use cpu, cuda, cuda:N, mps or xpu)",
                        field)  # fmt: skip
    _check_present(device, name, field)
    return name


def _check_present(device: torch.device, name: str, field: str) -> None:
    """UserError unless this machine has ``device`` (its backend, and its index when one is given)."""
    import torch

    backends = {"cuda": torch.cuda, "mps": torch.backends.mps, "xpu": getattr(torch, "xpu", None)}
    backend = backends.get(device.type)
    if backend is not None and not (hasattr(backend, "is_available") and backend.is_available()):
        raise UserError(f"{{{field}}} {name}: {device.type.upper()} is not available on this machine "
                        f"(use {{{field}}} cpu)", field)  # fmt: skip
    count = backend.device_count() if backend is not None and hasattr(backend, "device_count") else 1
    if device.index is not None and device.type != "cpu" and device.index >= count:
        raise UserError(f"{{{field}}} {name}: this machine has {count} {device.type} device(s), numbered from 0",
                        field)  # fmt: skip


def default_dtype(device: str, demo: bool = False) -> str:
    """bf16 on an accelerator; fp32 on the CPU (no fast bf16 there) and for the tiny demo model."""
    return "fp32" if demo or device == "cpu" else "bf16"
