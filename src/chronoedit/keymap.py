"""Parameter names of the original Wan / ComfyUI layout mapped to ours (= diffusers').

ComfyUI single files (``chrono_edit_14B_fp16.safetensors``), fp8 and GGUF repacks and NVIDIA's LoRAs use the original
Wan names (``blocks.0.self_attn.q``); the diffusers folder and our model use ``blocks.0.attn1.to_q``. The mapping is
one table of module renames; a key is ``<module>.<leaf>`` where the leaf (weight, bias, lora_down.weight, ...) is kept.
"""

from __future__ import annotations

import re

# Prefixes that wrappers put in front of the model's own names, longest first.
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")

# Original top-level module -> ours.
TOP_LEVEL = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "patch_embedding": "patch_embedding",
}

# Original module inside ``blocks.N`` -> ours. Note the swap: the original affine cross-attention norm is ``norm3``.
IN_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}

_OURS_TOP_LEVEL = {v: k for k, v in TOP_LEVEL.items()}
_OURS_IN_BLOCK = {v: k for k, v in IN_BLOCK.items()}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_ORIGINAL_MARKERS = ("self_attn.", "cross_attn.", "head.head", "time_embedding.", "text_embedding.", ".modulation")


def strip_prefix(key: str) -> str:
    """Remove one wrapper prefix (``model.diffusion_model.``, ``diffusion_model.``, ``transformer.``, ``model.``)."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def is_original_layout(keys: list[str] | set[str]) -> bool:
    """True when the names are the original Wan ones (any self_attn/cross_attn/head.head/... key)."""
    return any(marker in strip_prefix(k) for k in keys for marker in _ORIGINAL_MARKERS)


def _split_module(name: str, table: dict[str, str]) -> tuple[str, str] | None:
    """Longest module name of ``table`` that ``name`` starts with, and the rest (the leaf), or None."""
    for module in sorted(table, key=len, reverse=True):
        if name == module or name.startswith(module + "."):
            return module, name[len(module) :]
    return None


def original_to_ours(key: str) -> str | None:
    """``diffusion_model.blocks.3.self_attn.q.weight`` -> ``blocks.3.attn1.to_q.weight``; None if unknown."""
    name = strip_prefix(key)
    block = _BLOCK.match(name)
    if block:
        found = _split_module(block.group(2), IN_BLOCK)
        return None if found is None else f"blocks.{block.group(1)}.{IN_BLOCK[found[0]]}{found[1]}"
    found = _split_module(name, TOP_LEVEL)
    return None if found is None else f"{TOP_LEVEL[found[0]]}{found[1]}"


def ours_to_original(key: str) -> str | None:
    """The inverse of :func:`original_to_ours` (without a prefix); used to write original-layout files."""
    block = _BLOCK.match(key)
    if block:
        found = _split_module(block.group(2), _OURS_IN_BLOCK)
        return None if found is None else f"blocks.{block.group(1)}.{_OURS_IN_BLOCK[found[0]]}{found[1]}"
    found = _split_module(key, _OURS_TOP_LEVEL)
    return None if found is None else f"{_OURS_TOP_LEVEL[found[0]]}{found[1]}"
