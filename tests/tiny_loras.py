"""A small random LoRA for the tiny test checkpoints, in diffusers' key layout."""

from __future__ import annotations

import json
from pathlib import Path


def attention_lora(ckpt: Path, path: Path, rank: int = 4, seed: int = 0) -> Path:
    """Random up/down weights on q, k and v of the first block's self-attention of ``ckpt``'s transformer."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((ckpt / "transformer" / "config.json").read_text())
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ("to_q", "to_k", "to_v"):
        tensors[f"transformer.blocks.0.attn1.{name}.lora_A.weight"] = torch.randn(rank, dim, generator=g)
        tensors[f"transformer.blocks.0.attn1.{name}.lora_B.weight"] = torch.randn(dim, rank, generator=g)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


# The one module every layout's tiny LoRA targets: ours, and its original Wan name.
TARGET, TARGET_ORIGINAL = "blocks.0.attn1.to_q", "blocks.0.self_attn.q"
# layout -> part -> the file key of TARGET's part, as each trainer writes it (DiffSynth writes no alpha; diff/diff_b
# deltas are Wan/ComfyUI keys).
LAYOUT_KEYS: dict[str, dict[str, str]] = {
    "diffusers": {
        "down": f"transformer.{TARGET}.lora_A.weight",
        "up": f"transformer.{TARGET}.lora_B.weight",
        "alpha": f"transformer.{TARGET}.alpha",
    },
    "wan": {
        "down": f"diffusion_model.{TARGET_ORIGINAL}.lora_down.weight",
        "up": f"diffusion_model.{TARGET_ORIGINAL}.lora_up.weight",
        "alpha": f"diffusion_model.{TARGET_ORIGINAL}.alpha",
        "diff_b": f"diffusion_model.{TARGET_ORIGINAL}.diff_b",
        "diff": f"diffusion_model.{TARGET_ORIGINAL}.diff",
    },
    "wan-lora_A_B": {
        "down": f"diffusion_model.{TARGET_ORIGINAL}.lora_A.weight",
        "up": f"diffusion_model.{TARGET_ORIGINAL}.lora_B.weight",
        "alpha": f"diffusion_model.{TARGET_ORIGINAL}.alpha",
    },
    "diffsynth": {
        "down": f"{TARGET_ORIGINAL}.lora_A.default.weight",
        "up": f"{TARGET_ORIGINAL}.lora_B.default.weight",
    },
    "musubi": {
        "down": "lora_unet_" + TARGET_ORIGINAL.replace(".", "_") + ".lora_down.weight",
        "up": "lora_unet_" + TARGET_ORIGINAL.replace(".", "_") + ".lora_up.weight",
        "alpha": "lora_unet_" + TARGET_ORIGINAL.replace(".", "_") + ".alpha",
    },
}


def layout_tensors(layout: str, dim: int, rank: int = 4, seed: int = 0) -> dict:
    """A small, finite LoRA on TARGET (a ``dim`` x ``dim`` linear) with the keys of ``layout`` (``LAYOUT_KEYS``):
    down [rank, dim], up [dim, rank], alpha 8 (a 0-dim tensor), diff [dim, dim], diff_b [dim]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    values = {
        "down": 0.1 * torch.randn(rank, dim, generator=g),
        "up": 0.1 * torch.randn(dim, rank, generator=g),
        "alpha": torch.tensor(8.0),
        "diff_b": 0.1 * torch.randn(dim, generator=g),
        "diff": 0.1 * torch.randn(dim, dim, generator=g),
    }
    return {key: values[part] for part, key in LAYOUT_KEYS[layout].items()}
