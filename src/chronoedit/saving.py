"""Write a transformer as a diffusers-layout folder: config.json naming our class, sharded safetensors + index.

The folder is built beside the target and renamed into place, so a failed write leaves no half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import UserError, one_line
from .files import os_reason, write_json
from .loading import INDEX_NAME, WEIGHTS_NAME
from .model import ChronoEditTransformer3DModel

DEFAULT_SHARD_BYTES = 5 * 1024**3


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group keys in order into shards of at most ``max_shard_bytes`` (a bigger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def save_transformer(
    model: ChronoEditTransformer3DModel,
    folder: str | os.PathLike[str],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save ``model`` to ``folder`` (which must not exist) in the layout ``from_pretrained`` reads. ``state_dict``:
    the weights to write instead of the model's own (e.g. gathered from a sharded training run). UserError when the
    folder exists or cannot be written (no permission, a full disk)."""
    from safetensors import SafetensorError

    folder = Path(folder)
    if folder.exists():
        raise UserError(f"output folder already exists: {folder}")
    state = {k: v.detach().contiguous() for k, v in (state_dict or model.state_dict()).items()}
    shards = plan_shards([(k, v.numel() * v.element_size()) for k, v in state.items()], max_shard_bytes)
    tmp: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        write_shards(state, shards, tmp)
        write_json(tmp / "config.json", model.config.to_dict())
        os.replace(tmp, folder)
    except OSError as err:
        raise UserError(f"cannot write {folder}: {os_reason(err)}") from err
    except SafetensorError as err:  # safetensors reports a failed write as its own error, not an OSError
        if "I/O error" not in str(err):
            raise
        raise UserError(f"cannot write {folder}: {one_line(err)}") from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_shards(state: dict[str, torch.Tensor], shards: list[list[str]], folder: Path) -> None:
    """One safetensors file per group of keys (plus the index when there are several), named as diffusers does."""
    from safetensors.torch import save_file

    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = WEIGHTS_NAME if len(shards) == 1 else f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k].to("cpu") for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    if len(shards) > 1:
        total = sum(state[k].numel() * state[k].element_size() for k in weight_map)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(folder / INDEX_NAME, index)
