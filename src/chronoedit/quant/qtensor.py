"""A weight kept quantized: raw bytes, a quantization type, a logical shape (and an fp8 scale).

Storage is always ``uint8`` bytes (GGUF blocks as in the file, fp8 values and fp32 scales reinterpreted as bytes),
so casting a model (``.to(bfloat16)``, ``cast_to``) never touches it while ``.to(device)`` still moves it.
Dequantization computes in float32 (what the GGUF reference and the fp8-at-load path do) and then casts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .ggml import BLOCK_KERNELS

# GGML type name -> (values per block, bytes per block). Only types we can dequantize are listed.
GGML_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FP8_TYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SUPPORTED_QTYPES = (*GGML_SIZES, *FP8_TYPES)


@dataclass
class QTensor:
    """``data``: uint8 bytes ([n_blocks, block_bytes] for GGUF, [*shape] for fp8); ``shape``: the logical shape
    ([out, in] for a Linear weight); ``scale``: fp8 dequantization scale (float32, scalar or broadcastable)."""

    qtype: str
    data: torch.Tensor
    shape: tuple[int, ...]
    scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.qtype not in SUPPORTED_QTYPES:
            raise ValueError(f"unsupported quantization type {self.qtype!r} (supported: {', '.join(SUPPORTED_QTYPES)})")
        if self.data.dtype != torch.uint8:
            raise ValueError(f"QTensor data must be uint8 bytes, got {self.data.dtype}")
        if self.data.numel() != expected_bytes(self.qtype, self.shape):
            raise ValueError(
                f"{self.qtype} tensor of shape {list(self.shape)} needs {expected_bytes(self.qtype, self.shape)} "
                f"bytes, got {self.data.numel()}"
            )

    @property
    def is_float(self) -> bool:
        """Plain F32/F16/BF16 storage (not a block or fp8 quantization)."""
        return self.qtype in FLOAT_TYPES

    @property
    def nbytes(self) -> int:
        extra = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return self.data.numel() + extra

    def to(self, device: str | torch.device) -> QTensor:
        scale = None if self.scale is None else self.scale.to(device)
        return QTensor(self.qtype, self.data.to(device), self.shape, scale)

    def dequantize(self, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> torch.Tensor:
        return dequantize(self, dtype, device)


def expected_bytes(qtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``shape`` takes in ``qtype``; ValueError when its rows are not whole blocks."""
    numel = math.prod(shape)
    if qtype in FP8_TYPES:
        return numel
    block, size = GGML_SIZES[qtype]
    if shape and shape[-1] % block:
        raise ValueError(f"{qtype}: rows of {shape[-1]} values are not whole blocks of {block}")
    return numel // block * size


def from_fp8(tensor: torch.Tensor, scale: torch.Tensor | None) -> QTensor:
    """An fp8 (e4m3fn / e5m2) tensor and its optional scale as a QTensor (bytes shared, not copied)."""
    qtype = next((name for name, dtype in FP8_TYPES.items() if dtype == tensor.dtype), None)
    if qtype is None:
        raise ValueError(f"not an fp8 tensor: {tensor.dtype}")
    data = tensor.contiguous().view(torch.uint8)
    return QTensor(qtype, data, tuple(tensor.shape), None if scale is None else scale.float())


def dequantize(
    qt: QTensor, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> torch.Tensor:
    """The logical tensor [*shape] in ``dtype`` on ``device`` (default: where the bytes are)."""
    data = qt.data if device is None else qt.data.to(device, non_blocking=True)
    if qt.qtype in FLOAT_TYPES:
        return data.contiguous().view(FLOAT_TYPES[qt.qtype]).reshape(qt.shape).to(dtype)
    if qt.qtype in FP8_TYPES:
        values = data.contiguous().view(FP8_TYPES[qt.qtype]).reshape(qt.shape).float()
        if qt.scale is not None:
            values = values * qt.scale.to(values.device)
        return values.to(dtype)
    _, size = GGML_SIZES[qt.qtype]
    blocks = data.reshape(-1, size)  # [n_blocks, bytes per block]
    return BLOCK_KERNELS[qt.qtype](blocks).reshape(qt.shape).to(dtype)
