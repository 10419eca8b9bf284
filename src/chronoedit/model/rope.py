"""3-axis rotary position embedding with ChronoEdit's temporal skip.

The head dimension is split into (t, h, w) parts; each axis rotates interleaved (even, odd) channel pairs by
``position / theta ** (2k / d_axis)``. A plain edit has two latent frames, the input and the edit; ChronoEdit places
them at temporal positions 0 and ``temporal_skip_len - 1`` (0 and 7), the ends of the 8-frame reasoning video.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

CACHE_SIZE = 4  # (grid, device) tables kept: plain edit + reasoning, at a couple of sizes


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (t, h, w): h = w = 2 * (head_dim // 6), t takes the rest. 128 -> (44, 42, 42)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def temporal_positions(num_frames: int, temporal_skip_len: int) -> torch.Tensor:
    """Time-grid positions of the latent frames: [0, skip - 1] for a 2-frame edit, else 0..F-1."""
    if num_frames == 2:
        return torch.tensor([0, temporal_skip_len - 1], dtype=torch.float64)
    return torch.arange(num_frames, dtype=torch.float64)


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Rotation angles [len(positions), dim // 2] in float64."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
    return torch.outer(positions, inv_freq)


class RotaryEmbedding(nn.Module):
    """Builds cos/sin tables for a (frames, rows, cols) token grid.

    Tables are computed in float64, returned in float32 and cached for the last few grids and devices. They are not
    buffers, so no ``.to(dtype)`` on the model can lower their precision.
    """

    def __init__(self, head_dim: int, max_seq_len: int, temporal_skip_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.dims = axis_dims(head_dim)
        self.max_seq_len = max_seq_len
        self.temporal_skip_len = temporal_skip_len
        self.theta = theta
        self._cache: OrderedDict[tuple[int, int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def forward(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """grid: (F, H, W) in patches -> (cos, sin), each [1, F*H*W, 1, head_dim // 2] float32."""
        key = (*grid, device)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self._cache[key] = self._build(grid, device)
            if len(self._cache) > CACHE_SIZE:  # a server sees many sizes; keep the recent few
                self._cache.popitem(last=False)
        return self._cache[key]

    def _build(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        frames, rows, cols = grid
        if max(frames, rows, cols, self.temporal_skip_len) > self.max_seq_len:
            raise ValueError(f"token grid {grid} exceeds rope_max_seq_len {self.max_seq_len}")
        t = _axis_angles(temporal_positions(frames, self.temporal_skip_len), self.dims[0], self.theta)
        h = _axis_angles(torch.arange(rows, dtype=torch.float64), self.dims[1], self.theta)
        w = _axis_angles(torch.arange(cols, dtype=torch.float64), self.dims[2], self.theta)
        angles = torch.cat(  # [F, H, W, head_dim // 2], frame-major token order
            [
                t[:, None, None, :].expand(frames, rows, cols, -1),
                h[None, :, None, :].expand(frames, rows, cols, -1),
                w[None, None, :, :].expand(frames, rows, cols, -1),
            ],
            dim=-1,
        ).reshape(1, frames * rows * cols, 1, -1)
        return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs. x: [B, L, heads, head_dim]; cos/sin: [1, L, 1, head_dim // 2]."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [B, L, heads, head_dim // 2]
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # fp32 island
    return rotated.flatten(-2).type_as(x)
