"""Attention over a token sequence split across ranks: Ulysses (all-to-all from a sequence shard with all heads to
the whole chunk with a share of the heads), ring attention (keys and values passed around the ring, partial results
merged by their log-sum-exp), and both at once (Ulysses inside a ring). Collectives through ``torch.distributed``
(gloo on the CPU, NCCL on GPUs).

Padding: the sequence is padded to a multiple of the ranks, and padded keys are never attended to: each chunk's
keys are cut to its real tokens before the attention (no mask needed); padded queries give rows that are dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

LocalAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # [B,L,h,hd] x3 -> [B,L,h*hd]


def ulysses_scatter_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x: [S, B, Ls, H, hd] (S stacked tensors, this rank's Ls tokens, all heads) -> [S, B, U * Ls, H / U, hd]: the
    group's U shards of the sequence, in rank order, for this rank's H / U heads."""
    size = dist.get_world_size(group)
    if size == 1:
        return x
    s, b, ls, h, hd = x.shape
    send = x.reshape(s, b, ls, size, h // size, hd).permute(3, 0, 1, 2, 4, 5).contiguous()  # [U, S, B, Ls, H/U, hd]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's tokens, my heads
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(s, b, size * ls, h // size, hd)


def ulysses_gather_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x: [B, U * Ls, H / U, hd] (the chunk, my heads) -> [B, Ls, H * hd] (my tokens, all heads in order)."""
    size = dist.get_world_size(group)
    if size == 1:
        return x.flatten(2)
    b, lc, h, hd = x.shape
    send = x.reshape(b, size, lc // size, h, hd).permute(1, 0, 2, 3, 4).contiguous()  # [U, B, Ls, H/U, hd]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: my tokens, rank j's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, lc // size, size * h * hd)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Lq, h, hd], k/v: [B, Lk, h, hd] -> (out [B, Lq, h, hd] fp32, log-sum-exp of the scores [B, Lq, h] fp32).

    PyTorch's fused kernels that return the log-sum-exp: the CPU flash kernel, CUDA's flash kernel for half
    precision (unverified here: no GPU); otherwise the scores in full, in float32."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, h, L, hd]
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)[:2]
    elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    else:
        scores = (qt.float() @ kt.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, h, Lq, Lk]
        lse = scores.logsumexp(dim=-1)
        out = torch.softmax(scores, dim=-1) @ vt.float()
    return out.transpose(1, 2).float(), lse.transpose(1, 2).float()


def merge(acc: tuple[torch.Tensor, torch.Tensor] | None, part: tuple[torch.Tensor, torch.Tensor]):
    """Two partial attentions over disjoint keys -> the attention over both: out [B, L, h, hd], lse [B, L, h]."""
    if acc is None:
        return part
    (out_a, lse_a), (out_b, lse_b) = acc, part
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * torch.exp(lse_a - lse).unsqueeze(-1) + out_b * torch.exp(lse_b - lse).unsqueeze(-1)
    return out, lse


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, valid: Callable[[int], int]
) -> torch.Tensor:
    """q/k/v: [B, Lc, h, hd], this ring rank's chunk -> [B, Lc, h, hd]: q attends to every rank's chunk of keys,
    which travel once around the ring (the next chunk is in flight while this one is computed). ``valid(j)``: the
    real tokens in ring rank j's chunk (its keys beyond are padding)."""
    size, me = dist.get_world_size(group), dist.get_rank(group)
    peers = (dist.get_global_rank(group, (me + 1) % size), dist.get_global_rank(group, (me - 1) % size))
    kv, acc = torch.stack([k, v]).contiguous(), None  # [2, B, Lc, h, hd]
    for step in range(size):
        pending, incoming = None, None
        if step + 1 < size:
            incoming = torch.empty_like(kv)
            pending = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, peers[0], group),
                                              dist.P2POp(dist.irecv, incoming, peers[1], group)])  # fmt: skip
        held = valid((me - step) % size)  # the chunk this rank holds at this step
        if held:
            acc = merge(acc, attention_with_lse(q, kv[0][:, :held], kv[1][:, :held]))
        for work in pending or ():
            work.wait()
        kv = incoming if incoming is not None else kv
    return acc[0].to(q.dtype)  # rank 0's chunk always holds real tokens: acc is set
