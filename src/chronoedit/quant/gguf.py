"""GGUF files (city96-style repacks of Wan / ChronoEdit): tensor names, quantization types and raw blocks.

The header is parsed with the ``gguf`` package's ``GGUFReader`` (the file is memory-mapped; tensor data is not
touched). GGUF lists dimensions innermost first, so the logical torch shape is the reverse; tensors with more than
4 dimensions (the Conv3d patch embedding) are stored flattened with their shape in the metadata key
``comfy.gguf.orig_shape.<name>``. Each tensor's bytes are then read from the file straight into its own torch
buffer, one tensor at a time (no second copy, no mapped pages kept resident).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .qtensor import GGML_SIZES, QTensor

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
MIN_GGUF_VERSION = (0, 13)  # 0.10 / 0.11 call ndarray.newbyteorder, which numpy 2 removed


@dataclass(frozen=True)
class GGUFEntry:
    """One tensor of a GGUF file: its name, GGML type name, logical shape, byte offset and size."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _import_gguf() -> Any:
    """The optional ``gguf`` package, or an ImportError saying how to install or upgrade it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import gguf

        installed = version("gguf")
    except (ImportError, PackageNotFoundError) as err:
        raise ImportError("reading .gguf files needs the gguf package: pip install 'chronoedit[gguf]'") from err
    numbers = tuple(int(part) for part in installed.split(".")[:2] if part.isdigit())
    if numbers < MIN_GGUF_VERSION:
        raise ImportError(
            f"reading .gguf files needs gguf>={'.'.join(map(str, MIN_GGUF_VERSION))} (older readers fail with "
            f"numpy 2), found {installed}: pip install -U 'chronoedit[gguf]'"
        )
    return gguf


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _reader_failure(err: BaseException) -> str:
    """What a GGUFReader exception most likely means."""
    text = str(err)
    if "magic" in text.lower():
        return "not a GGUF file"
    if "GGMLQuantizationType" in text:
        return "unknown tensor quantization type (newer or non-standard GGUF)"
    return "truncated or corrupt file"


def read_gguf_index(path: str | os.PathLike[str]) -> list[GGUFEntry]:
    """Every tensor of ``path`` with its logical shape; a one-line UserError naming the file when it is not a
    readable GGUF, and naming the tensor and type when a type cannot be dequantized."""
    gguf = _import_gguf()
    path = Path(path)
    if path.stat().st_size == 0:
        raise UserError(f"cannot read GGUF {path}: empty file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OSError, OverflowError) as err:
        raise UserError(f"cannot read GGUF {path}: {_reader_failure(err)} ({_first_line(err)})") from err
    if reader.byte_order == "S":
        raise UserError(f"cannot read GGUF {path}: big-endian GGUF files are not supported")
    size = path.stat().st_size
    entries = []
    for tensor in reader.tensors:
        qtype = tensor.tensor_type.name
        if qtype not in GGML_SIZES:
            raise UserError(
                f"GGUF {path}: tensor {tensor.name!r} has quantization type {qtype}, which chronoedit cannot "
                f"dequantize (supported: {', '.join(GGML_SIZES)})"
            )
        shape = _orig_shape(reader, tensor.name) or tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if math.prod(shape) != int(tensor.n_elements):
            raise UserError(f"GGUF {path}: tensor {tensor.name!r} has {tensor.n_elements} values, not {list(shape)}")
        entry = GGUFEntry(tensor.name, qtype, shape, int(tensor.data_offset), int(tensor.n_bytes))
        if entry.offset + entry.nbytes > size:
            raise UserError(f"cannot read GGUF {path}: truncated (tensor {tensor.name!r} runs past the end)")
        entries.append(entry)
    return entries


def _orig_shape(reader: object, name: str) -> tuple[int, ...] | None:
    """The shape city96's converter records for tensors of more than 4 dimensions, if any."""
    field = reader.get_field(ORIG_SHAPE_KEY + name)  # type: ignore[attr-defined]
    if field is None:
        return None
    return tuple(int(field.parts[i][0]) for i in field.data)


def gguf_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name (as in the file) -> logical shape, from the header only."""
    return {entry.name: entry.shape for entry in read_gguf_index(path)}


def iter_gguf(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Iterator[tuple[str, QTensor]]:
    """Yield (name as in the file, QTensor) one tensor at a time, its bytes read into a fresh torch buffer."""
    entries = read_gguf_index(path)
    with open(path, "rb") as handle:
        for entry in entries:
            yield entry.name, QTensor(entry.qtype, _read_bytes(handle, entry, path), entry.shape).to(device)


def _read_bytes(handle: object, entry: GGUFEntry, path: str | os.PathLike[str]) -> torch.Tensor:
    """[n_blocks, bytes per block] uint8 read from the file at the tensor's offset."""
    _, block_bytes = GGML_SIZES[entry.qtype]
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    handle.seek(entry.offset)  # type: ignore[attr-defined]
    got = handle.readinto(memoryview(buffer.numpy()))  # type: ignore[attr-defined]
    if got != entry.nbytes:
        raise UserError(f"cannot read GGUF {path}: truncated (tensor {entry.name!r} has {got} of {entry.nbytes} bytes)")
    return buffer.reshape(-1, block_bytes)
