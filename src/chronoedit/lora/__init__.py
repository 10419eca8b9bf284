"""LoRA files of every layout in the wild (diffusers, Wan/ComfyUI, DiffSynth, musubi), read into one form and
attached to our transformer with peft, several at once with their own scales.

:mod:`.formats` holds the form, the layouts (listed there), reading and writing (:func:`write_lora`); :mod:`.adapters`
matches a file to the model and manages the adapters (peft layers for the low-rank pairs; ``diff``/``diff_b`` added
at forward time by :mod:`.deltas`, so the base parameters stay untouched until a fuse); :mod:`.saving` writes an
adapter of a model (:func:`save_lora`). Everything public is re-exported here.
"""

from __future__ import annotations

from .adapters import (
    MAX_SCALE,
    active_adapters,
    adapter_modules,
    check_scale,
    disable_lora,
    enable_lora,
    fuse_lora,
    list_adapters,
    load_lora,
    match_model,
    set_adapters,
    unfuse_lora,
    unload_lora,
)
from .formats import (
    LAYOUTS,
    LEAVES,
    METADATA_KEY,
    WRITABLE_LAYOUTS,
    LoraFile,
    LoraModule,
    all_finite,
    as_lora_file,
    check_values,
    convert_state_dict,
    detect_layout,
    lora_config,
    lora_file_path,
    our_module_name,
    read_lora,
    read_metadata,
    split_key,
    write_lora,
)
from .saving import save_lora

__all__ = [
    "LAYOUTS",
    "LEAVES",
    "MAX_SCALE",
    "METADATA_KEY",
    "WRITABLE_LAYOUTS",
    "LoraFile",
    "LoraModule",
    "active_adapters",
    "adapter_modules",
    "all_finite",
    "as_lora_file",
    "check_scale",
    "check_values",
    "convert_state_dict",
    "detect_layout",
    "disable_lora",
    "enable_lora",
    "fuse_lora",
    "list_adapters",
    "load_lora",
    "lora_config",
    "lora_file_path",
    "match_model",
    "our_module_name",
    "read_lora",
    "read_metadata",
    "save_lora",
    "set_adapters",
    "split_key",
    "unfuse_lora",
    "unload_lora",
    "write_lora",
]
