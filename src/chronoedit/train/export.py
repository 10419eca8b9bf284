"""The dtype a full fine-tune is saved in: the base checkpoint's own (bf16 for NVIDIA's 14B: 28 GB rather than 57 GB
in fp32), with the float32 islands (norms, modulation tables, ...) float32 as they are loaded; ``save_fp32`` keeps
every weight in float32. Training itself keeps fp32 master weights (and resumable checkpoints hold them)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch

STORED = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def base_dtype(model_path: str) -> torch.dtype:
    """The most common floating dtype of the base transformer's safetensors weights (by element count); bf16 when
    they are quantized (fp8, GGUF) or unreadable as safetensors."""
    from safetensors import safe_open

    from ..loading import component_dir, resolve_checkpoint, weight_files

    counts: Counter[torch.dtype] = Counter()
    for file in weight_files(component_dir(resolve_checkpoint(model_path), "transformer")):
        if file.suffix != ".safetensors":
            continue
        with safe_open(str(file), framework="pt") as handle:
            keys = handle.keys()
            for key in keys:
                part = handle.get_slice(key)
                dtype = STORED.get(part.get_dtype())
                if dtype is not None:
                    counts[dtype] += _numel(part.get_shape())
    return counts.most_common(1)[0][0] if counts else torch.bfloat16


def _numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def cast_for_saving(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each floating weight in ``dtype``, the float32 islands in float32 (as :func:`chronoedit.loading.load_transformer`
    places them); other tensors unchanged."""
    from ..loading import target_dtype

    return {name: t.to(target_dtype(name, dtype)) if t.is_floating_point() else t for name, t in state.items()}
