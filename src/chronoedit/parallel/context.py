"""One edit on several ranks: the process groups of a :class:`~.layout.Layout` and what the model and the sampling
loop ask of them.

- the transformer (:meth:`split`, :meth:`attention`, :meth:`join`): each rank of a branch's group keeps one shard of
  the token sequence through every block; self-attention gathers what it needs (:mod:`.attention`); cross-attention
  and everything per token run on the shard as they are; the output shards are gathered at the end;
- classifier-free guidance (:attr:`branch`, :meth:`exchange`): with ``cfg = 2`` each half of the ranks runs one
  branch and the two flows are swapped, so every rank takes the same guided step;
- :meth:`broadcast`: the starting noise from rank 0, so all ranks start alike even without a seed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .attention import ring_attention, ulysses_gather_heads, ulysses_scatter_heads
from .layout import Layout

Rope = tuple[torch.Tensor, torch.Tensor]


class ContextParallel:
    """The process groups of ``layout`` over the running default process group (whose size must be its world)."""

    def __init__(self, layout: Layout, device_type: str) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        if dist.get_world_size() != layout.world:
            raise ValueError(f"the layout is for {layout.world} ranks, the process group has {dist.get_world_size()}")
        self.layout = layout
        mesh = init_device_mesh(device_type, (layout.cfg, layout.ring, layout.ulysses),
                                mesh_dim_names=("cfg", "ring", "ulysses"))  # fmt: skip
        self.cfg_group, self.ring_group = mesh.get_group("cfg"), mesh.get_group("ring")
        self.ulysses_group = mesh.get_group("ulysses")
        self.rank = dist.get_rank()
        cfg, ring, ulysses = layout.coordinates(self.rank)
        self.branch = cfg  # 0: the conditional branch, 1: the unconditional one (with cfg = 2)
        self.ring_index, self.shard = ring, ring * layout.ulysses + ulysses  # this rank's place in the sequence
        self.length = 0  # real tokens of the sequence being run (set by split)

    # ----- the sequence (called by the transformer) -------------------------------------------------------------
    def split(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, Rope]:
        """x: [B, L, D], rope (cos, sin): [1, L, 1, hd/2] -> this rank's shard of each, [.., L' / N, ..] where L'
        is L padded up to a multiple of the N sequence ranks. Remembers L for this forward's attentions."""
        self.length = x.shape[1]
        return self._shard(x, 1), (self._shard(rope[0], 1), self._shard(rope[1], 1))

    def _shard(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        n = self.layout.sequence
        padded = math.ceil(t.shape[dim] / n) * n
        pad = [0, 0] * (t.ndim - dim - 1) + [0, padded - t.shape[dim]]
        return F.pad(t, pad).chunk(n, dim=dim)[self.shard]

    @torch.compiler.disable
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  local: Callable[..., torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """q/k/v: [B, Ls, H, hd] (this rank's tokens) -> [B, Ls, H * hd]: attention over all the real tokens of the
        sequence last :meth:`split`.
        ``local(q, k, v) -> [B, Lq, h * hd]`` is the single-device attention (used when there is no ring)."""
        q, k, v = ulysses_scatter_heads(torch.stack([q, k, v]), self.ulysses_group)  # each [B, Lc, H/U, hd]
        chunk, length = q.shape[1], self.length
        if self.layout.ring == 1:
            out = local(q, k[:, :length], v[:, :length]).unflatten(2, (q.shape[2], -1))  # [B, Lc, H/U, hd]
        else:
            valid = functools.partial(_valid, length=length, chunk=chunk)
            out = ring_attention(q, k, v, self.ring_group, valid)
        return ulysses_gather_heads(out, self.ulysses_group)

    def join(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """x: [B, Ls, C] (this rank's shard) -> [B, length, C]: every shard in order, padding dropped."""
        for group in (self.ulysses_group, self.ring_group):  # ulysses inside, ring outside: shard = r * U + u
            x = _all_gather(x, group, dim=1)
        return x[:, :length]

    # ----- guidance and noise (called by the sampling loop) -----------------------------------------------------
    @property
    def splits_cfg(self) -> bool:
        return self.layout.cfg > 1

    def exchange(self, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's branch flow -> (conditional, unconditional) flows, the same on every rank."""
        positive, negative = _all_gather(flow.contiguous(), self.cfg_group, dim=0).chunk(2)
        return positive, negative

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (in place)."""
        dist.broadcast(tensor, src=0)
        return tensor


def _valid(index: int, length: int, chunk: int) -> int:
    """Real (unpadded) tokens in chunk ``index`` of ``chunk`` tokens, for a sequence of ``length``."""
    return max(0, min(chunk, length - index * chunk))


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in group-rank order."""
    size = dist.get_world_size(group)
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
