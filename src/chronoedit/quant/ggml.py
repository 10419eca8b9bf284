"""GGML block quantizations dequantized in torch (any device), written from the GGML block layouts.

Every kernel maps ``blocks`` [n, bytes per block] (uint8) to float32 [n, values per block]. Half-precision block
scales are little-endian fp16. Legacy types use blocks of 32 values; K-quants use super-blocks of 256 values split
into sub-blocks of 16 or 32 with their own (quantized) scales and minima.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

QK_K = 256


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32."""
    return raw.contiguous().view(torch.float16).float()


def _shifts(values: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device)


def _bits(raw: torch.Tensor) -> torch.Tensor:
    """[n, k] uint8 -> [n, 8k] uint8: bit j of the little-endian integer the k bytes form."""
    return ((raw.unsqueeze(-1) >> _shifts(tuple(range(8)), raw)) & 1).flatten(-2)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] -> [n, 32]: low nibbles are values 0..15, high nibbles values 16..31 (legacy 4/5-bit types)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """34 bytes: d (f16), 32 int8 -> d * q."""
    return _f16(blocks[:, :2]) * blocks[:, 2:].view(torch.int8).float()


def q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """18 bytes: d, 16 bytes of nibbles -> d * (q - 8)."""
    return _f16(blocks[:, :2]) * (_nibbles(blocks[:, 2:]).float() - 8)


def q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """20 bytes: d, m, 16 bytes of nibbles -> d * q + m."""
    return _f16(blocks[:, :2]) * _nibbles(blocks[:, 4:]).float() + _f16(blocks[:, 2:4])


def q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """22 bytes: d, 32 high bits (uint32), 16 bytes of nibbles -> d * (q - 16)."""
    q = _nibbles(blocks[:, 6:]) | (_bits(blocks[:, 2:6]) << 4)  # [n, 32] in 0..31
    return _f16(blocks[:, :2]) * (q.float() - 16)


def q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """24 bytes: d, m, 32 high bits, 16 bytes of nibbles -> d * q + m."""
    q = _nibbles(blocks[:, 8:]) | (_bits(blocks[:, 4:8]) << 4)
    return _f16(blocks[:, :2]) * q.float() + _f16(blocks[:, 2:4])


def _two_bit_planes(qs: torch.Tensor) -> torch.Tensor:
    """[n, 64] -> [n, 256]: two halves of 32 bytes, each byte holding values l, l+32, l+64, l+96 of its half."""
    n = qs.shape[0]
    return ((qs.reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), qs).reshape(1, 1, 4, 1)) & 3).reshape(n, QK_K)


def q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """84 bytes: 16 scale bytes (low nibble scale, high nibble min), 64 bytes of 2-bit values, d, dmin."""
    n = blocks.shape[0]
    scales = blocks[:, :16]
    q = _two_bit_planes(blocks[:, 16:80]).float().reshape(n, 16, 16)  # [n, sub-block, value]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    scale = (d * (scales & 0x0F).float()).unsqueeze(-1)
    minimum = (dmin * (scales >> 4).float()).unsqueeze(-1)
    return (scale * q - minimum).reshape(n, QK_K)


def _q3_k_scales(raw: torch.Tensor) -> torch.Tensor:
    """[n, 12] -> [n, 16] signed 6-bit scales: low 4 bits from bytes 0..7 (low then high nibbles), high 2 bits
    from bytes 8..11 (scale i takes bits 2(i//4).. of byte 8 + i%4)."""
    n = raw.shape[0]
    low = torch.cat([raw[:, :8] & 0x0F, raw[:, :8] >> 4], dim=-1)
    high = ((raw[:, 8:12].reshape(n, 1, 4) >> _shifts((0, 2, 4, 6), raw).reshape(1, 4, 1)) & 3).reshape(n, 16)
    return (low | (high << 4)).float() - 32


def q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """110 bytes: 32 bytes high-bit mask, 64 bytes of low 2 bits, 12 bytes of scales, d. Values are -4..3."""
    n = blocks.shape[0]
    low = _two_bit_planes(blocks[:, 32:96])  # [n, 256]
    mask = (blocks[:, :32].reshape(n, 1, 32) >> _shifts(tuple(range(8)), blocks).reshape(8, 1)) & 1  # [n, 8, 32]
    q = low.float() - 4 * (1 - mask.reshape(n, QK_K).float())
    scale = _f16(blocks[:, 108:110]) * _q3_k_scales(blocks[:, 96:108])  # [n, 16]
    return (scale.unsqueeze(-1) * q.reshape(n, 16, 16)).reshape(n, QK_K)


def _k4_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 12] -> 8 six-bit scales and 8 six-bit minima (Q4_K / Q5_K packing), each [n, 8]."""
    first = raw[:, 0:4] & 63
    first_min = raw[:, 4:8] & 63
    second = (raw[:, 8:12] & 0x0F) | ((raw[:, 0:4] >> 6) << 4)
    second_min = (raw[:, 8:12] >> 4) | ((raw[:, 4:8] >> 6) << 4)
    return torch.cat([first, second], dim=-1).float(), torch.cat([first_min, second_min], dim=-1).float()


def _k4_values(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] -> [n, 8, 32]: four chunks of 32 bytes; low nibbles are sub-block 2c, high nibbles 2c+1."""
    n = qs.shape[0]
    return ((qs.reshape(n, 4, 1, 32) >> _shifts((0, 4), qs).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)


def _k_affine(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """d * scale_j * q - dmin * min_j for the 8 sub-blocks j of Q4_K / Q5_K; q: [n, 8, 32]."""
    scale, minimum = _k4_scales(blocks[:, 4:16])
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    return ((d * scale).unsqueeze(-1) * q.float() - (dmin * minimum).unsqueeze(-1)).reshape(q.shape[0], QK_K)


def q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """144 bytes: d, dmin, 12 bytes of 6-bit scales/minima, 128 bytes of nibbles."""
    return _k_affine(blocks, _k4_values(blocks[:, 16:144]))


def q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """176 bytes: d, dmin, 12 bytes of scales/minima, 32 bytes of high bits (bit j: sub-block j), 128 of nibbles."""
    n = blocks.shape[0]
    high = (blocks[:, 16:48].reshape(n, 1, 32) >> _shifts(tuple(range(8)), blocks).reshape(8, 1)) & 1  # [n, 8, 32]
    return _k_affine(blocks, _k4_values(blocks[:, 48:176]) | (high << 4))


def q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """210 bytes: 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, d. Values are -32..31."""
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 64)  # per half: value l (low nibble) and l + 64 (high nibble)
    low = ((ql >> _shifts((0, 4), blocks).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, QK_K)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)  # per half: bits 2k..2k+1 of byte l belong to value l + 32k
    high = ((qh >> _shifts((0, 2, 4, 6), blocks).reshape(1, 1, 4, 1)) & 3).reshape(n, QK_K)
    q = (low | (high << 4)).float() - 32
    scale = _f16(blocks[:, 208:210]) * blocks[:, 192:208].view(torch.int8).float()  # [n, 16]
    return (scale.unsqueeze(-1) * q.reshape(n, 16, 16)).reshape(n, QK_K)


BLOCK_KERNELS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": q4_0,
    "Q4_1": q4_1,
    "Q5_0": q5_0,
    "Q5_1": q5_1,
    "Q8_0": q8_0,
    "Q2_K": q2_k,
    "Q3_K": q3_k,
    "Q4_K": q4_k,
    "Q5_K": q5_k,
    "Q6_K": q6_k,
}
