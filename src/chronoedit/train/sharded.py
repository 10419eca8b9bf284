"""Full fine-tuning under FSDP2 without a whole model in any process: the transformer is built on the meta device,
sharded (one FSDP unit per transformer block, then the root, as accelerate's transformer-based wrap policy does),
materialised empty, and each process reads only its own rows of every weight from the safetensors files (FSDP2
shards each parameter along dim 0 in ``torch.chunk`` pieces). Peak host memory per process ~ one shard, not one
model (56 GB for the 14B in fp32 on each of 8 processes before; ~7 GB now).

accelerate's ``prepare`` leaves a model that is already an ``FSDPModule`` as it is (``fsdp2_prepare_model``), so
the training loop hands it the model sharded here. Parameters that are ``DTensor``s on a one-dimensional mesh only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..loading import (
    GGUF_SUFFIX,
    check_complete,
    check_tensor,
    target_dtype,
    transformer_source,
)
from ..model import ChronoEditTransformer3DModel


def shard_transformer(model: ChronoEditTransformer3DModel, mesh: Any, **fsdp: Any) -> ChronoEditTransformer3DModel:
    """``fully_shard`` each transformer block, then the root (embeddings, output head); ``fsdp``: more arguments of
    ``fully_shard`` (``mp_policy``, ``reshard_after_forward``, ``offload_policy``)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh, **fsdp)
    fully_shard(model, mesh=mesh, **fsdp)
    return model


def row_range(param: Any) -> tuple[int, int]:
    """The rows [start, stop) of a dim-0-sharded DTensor parameter this rank holds (``torch.chunk`` pieces)."""
    rows, ranks, rank = param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank()
    per = -(-rows // ranks)
    start, stop = min(rows, rank * per), min(rows, (rank + 1) * per)
    if param.to_local().shape[0] != stop - start:
        raise RuntimeError(f"FSDP laid out {tuple(param.to_local().shape)} rows here, expected {stop - start}")
    return start, stop


def load_sharded_transformer(
    path: str | os.PathLike[str],
    mesh: Any,
    subfolder: str | None = "transformer",
    dtype: torch.dtype = torch.float32,
    **fsdp: Any,
) -> ChronoEditTransformer3DModel:
    """The transformer of ``path`` (a checkpoint folder, or a transformer folder with ``subfolder=None``), sharded
    over ``mesh`` with each process holding only its rows, in ``dtype`` (float32 islands as always); trainable.
    UserError for checkpoints that are not dense safetensors (fp8, GGUF) or whose keys do not match."""
    source = transformer_source(path, subfolder)
    if source.scales or any(f.suffix.lower() == GGUF_SUFFIX for f in source.files):
        raise UserError(f"full fine-tuning needs a dense safetensors transformer, not fp8 or GGUF: {path}")
    with torch.device("meta"):
        model = ChronoEditTransformer3DModel(source.config).cast_to(dtype)
    shard_transformer(model, mesh, **fsdp)
    model.to_empty(device=mesh.device_type)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for file in source.files:
        seen |= _read_own_rows(file, source, params)
    check_complete(params, seen, path)
    return model.requires_grad_(True)


def _read_own_rows(file: Path, source: Any, params: dict[str, Any]) -> set[str]:
    """Copy this rank's rows of every weight in ``file`` into its shard; the names filled."""
    from safetensors import safe_open

    filled = set()
    shapes = {name: tuple(param.shape) for name, param in params.items()}
    with safe_open(str(file), framework="pt") as handle, torch.no_grad():
        for key in list(handle.keys()):
            name = source.weight_name(key, file)
            if name is None:
                continue
            stored = handle.get_slice(key)
            check_tensor(name, torch.empty(stored.get_shape(), device="meta"), shapes, file)
            param = params[name]
            start, stop = row_range(param)
            if stop > start:
                param.to_local().copy_(stored[start:stop].to(target_dtype(name, param.dtype)))
            filled.add(name)
    return filled
