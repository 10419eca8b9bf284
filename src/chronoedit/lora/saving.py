"""Saving a LoRA: an adapter loaded on a model (read back with :func:`.adapters.adapter_modules`), a
:class:`~.formats.LoraFile` or modules by our names, written by :func:`.formats.write_lora`.

Its own module so that :mod:`.formats` (the file form) never imports :mod:`.adapters` (the model side).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from .adapters import adapter_modules
from .formats import LoraFile, LoraModule, write_lora


def save_lora(
    source: nn.Module | LoraFile | Mapping[str, LoraModule],
    path: str | os.PathLike[str],
    layout: str = "diffusers",
    adapter_name: str | None = None,
) -> Path:
    """Write a LoRA (an adapter of a transformer, default its only one; a :class:`LoraFile`; or modules by our
    names) as safetensors in the ``diffusers`` layout (alpha in diffusers' header metadata), the ``wan`` (ComfyUI)
    layout, or ``wan_ab``: Wan names with ``lora_A``/``lora_B``, alpha folded into ``lora_B`` and ``.alpha`` = rank,
    which NVIDIA's DiffSynth inference, ComfyUI and diffusers all load alike (``wan``/``wan_ab`` also hold diff/diff_b
    deltas)."""
    modules = adapter_modules(source, adapter_name) if isinstance(source, nn.Module) else source
    return write_lora(modules, path, layout)
