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
