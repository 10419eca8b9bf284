"""Devices and dtypes by name: the one place that picks a default device and checks that a named one exists."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("bf16", "fp16", "fp32")


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
        kind = torch.device(name).type
    except (RuntimeError, ValueError):
        raise UserError(f"unknown {{{field}}} {name!r}", field) from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{{{field}}} {name}: CUDA is not available on this machine (use {{{field}}} cpu)", field)
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{{{field}}} {name}: MPS is not available on this machine (use {{{field}}} cpu)", field)
    return name


def default_dtype(device: str, demo: bool = False) -> str:
    """bf16 on an accelerator; fp32 on the CPU (no fast bf16 there) and for the tiny demo model."""
    return "fp32" if demo or device == "cpu" else "bf16"
