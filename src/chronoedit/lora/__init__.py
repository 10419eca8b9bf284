"""LoRA files of every layout in the wild, read into one form and attached to our transformer with peft.

Layouts (``detect_layout``), all converted to one form keyed by our module names (``blocks.0.attn1.to_q``):

- ``diffusers``: ``[transformer.]blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B.weight`` (+ ``.alpha`` keys or
  diffusers' ``lora_adapter_metadata``; ``lora_B.bias`` as written by diffusers for ``diff_b``);
- ``wan``: original Wan / ComfyUI names, ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` / ``lora_up`` (or
  ``lora_A`` / ``lora_B``), ``.alpha``, ``.diff_b`` (bias delta), ``.diff`` (full weight delta, e.g. of norms);
- ``diffsynth``: DiffSynth training output, ``blocks.0.self_attn.q.lora_A.default.weight``;
- ``musubi``: musubi-tuner, ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` (+ ``.alpha``).

A module's delta at scale ``s`` is ``s·(alpha/r)·up@down`` (no alpha: alpha = r) plus ``s·diff_b`` and ``s·diff``.
Low-rank pairs become peft LoRA layers (one peft adapter per file, per-adapter scales); ``diff``/``diff_b`` cannot be
peft layers, so they are written into the parameters: the original values are kept and every change of the active
set or scales recomputes ``original + Σ scale·delta`` (exact restore on disable/unload). Any such change unfuses first.

Modules: :mod:`.formats` (the form, layout detection, reading every layout, :func:`save_lora`) and :mod:`.adapters`
(matching the model, peft injection, the adapter state). Everything public is re-exported here.
"""

from __future__ import annotations

from .adapters import (
    active_adapters,
    adapter_modules,
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
    as_lora_file,
    convert_state_dict,
    detect_layout,
    lora_config,
    lora_file_path,
    our_module_name,
    read_lora,
    read_metadata,
    save_lora,
    split_key,
)

__all__ = [
    "LAYOUTS",
    "LEAVES",
    "METADATA_KEY",
    "WRITABLE_LAYOUTS",
    "LoraFile",
    "LoraModule",
    "active_adapters",
    "adapter_modules",
    "as_lora_file",
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
]
