"""Safetensors files memory-mapped: tensors that are views of the file's pages, not copies in anonymous memory.

``safetensors``' own ``get_tensor`` copies every tensor into process memory. Here the file is mapped copy-on-write
(``MAP_PRIVATE``) and each tensor is a view of its bytes: the kernel reads pages on first use and may drop them again
under pressure (they are file-backed, so a 33 GB bf16 transformer does not count as the process's anonymous memory),
and a tensor that is written to (a fused LoRA) gets private copies of only the pages it changes. The format: 8 bytes
little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets: [begin, end]}}``, then the data.
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import UserError
from .files import open_regular

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_MAX_HEADER = 100 << 20  # what safetensors itself accepts


def mapped_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for every tensor of a safetensors file, each a copy-on-write view of the mapped file; UserError
    naming the file when it is not a whole safetensors file."""
    path = Path(path)
    with open_regular(path, "weights") as handle:
        size = handle.seek(0, 2)
        handle.seek(0)
        header, data_start = _header(handle.read(min(size, 8 + _MAX_HEADER)), path, size)
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size > data_start else None
    for key, info in header.items():
        if key != "__metadata__":
            yield key, _view(mapped, key, info, data_start, size, path)


def _header(start: bytes, path: Path, size: int) -> tuple[dict, int]:
    """The parsed JSON header and where the data begins."""
    if len(start) < 8:
        raise UserError(f"cannot read weights {path}: truncated safetensors file (no header)")
    length = int.from_bytes(start[:8], "little")
    if length > _MAX_HEADER or 8 + length > size:
        raise UserError(f"cannot read weights {path}: truncated or corrupt safetensors file (header of {length} bytes)")
    try:
        header = json.loads(start[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read weights {path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise UserError(f"cannot read weights {path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + length


def _view(mapped: mmap.mmap | None, key: str, info: object, data_start: int, size: int, path: Path) -> torch.Tensor:
    """Tensor ``key`` as a view of the mapping."""
    try:
        dtype = _DTYPES[info["dtype"]]  # type: ignore[index]
        shape = [int(n) for n in info["shape"]]  # type: ignore[index]
        begin, end = (int(n) for n in info["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"cannot read weights {path}: bad header entry for {key!r} ({err})") from None
    count = math.prod(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if end - begin != count * itemsize or begin < 0 or data_start + end > size:
        raise UserError(f"cannot read weights {path}: truncated or corrupt safetensors file (tensor {key!r})")
    if count == 0 or mapped is None:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + begin).view(shape)
