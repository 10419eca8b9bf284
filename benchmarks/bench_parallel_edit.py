"""Context parallel on this machine, and a model of it on 8 x H100.

1. **CPU scaling** (one thread per process, gloo): the time of one denoising step's transformer work (CFG on: both
   branches) at a size where the transformer dominates, for N = 1 (one process), N = 2 with the sequence split
   (Ulysses 2, ring 2) and N = 2 with the CFG branches on two ranks; each N > 1 output is compared with N = 1
   (max abs difference). The model is a random ChronoEdit transformer (``--layers``, ``--heads`` x 64, FFN 4x) at
   ``--frames`` x ``--latent`` latent tokens (patch 2x2).
2. **8 x H100 at 720p** (a model, not a measurement: no GPU here): compute per rank from the FLOPs of the 14B at a
   720p 2-frame edit (7200 video tokens, CFG batch 2) at an assumed sustained bf16 rate, plus the Ulysses
   all-to-alls' bytes per layer over NVLink at an assumed all-to-all bandwidth, not overlapped (conservative); next
   to the published figures of cache-dit and diffusers.

Run: ``.venv/bin/python benchmarks/bench_parallel_edit.py`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from chronoedit.model import ChronoEditTransformer3DModel
from chronoedit.parallel import ContextParallel, Layout


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12, help="attention heads of 64 channels")
    parser.add_argument("--frames", type=int, default=2, help="latent frames (2: a plain edit)")
    parser.add_argument("--latent", type=int, nargs=2, default=(32, 48), metavar=("H", "W"), help="latent size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tflops", type=float, default=400.0, help="sustained bf16 TFLOP/s per H100 for the model")
    parser.add_argument("--a2a-gbps", type=float, default=300.0, help="all-to-all GB/s per H100 (NVLink) for the model")
    return parser.parse_args()


def build(args: argparse.Namespace) -> tuple[ChronoEditTransformer3DModel, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    dim = args.heads * 64
    model = ChronoEditTransformer3DModel(num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=64,
                                         ffn_dim=4 * dim, text_dim=256, freq_dim=256, image_dim=256,
                                         added_kv_proj_dim=dim).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 36, args.frames, *args.latent, generator=g), torch.tensor([700.0, 700.0]),
              torch.randn(2, 512, 256, generator=g), torch.randn(2, 257, 256, generator=g))  # fmt: skip
    return model, inputs


@torch.no_grad()
def step(model: ChronoEditTransformer3DModel, inputs: tuple[torch.Tensor, ...], cp: ContextParallel | None):
    """One step's transformer work with CFG: both branches in one batch, or this rank's branch and an exchange."""
    if cp is not None and cp.splits_cfg:
        mine = slice(cp.branch, cp.branch + 1)
        flow = model(*(t[mine] for t in inputs), return_dict=False)[0]
        return torch.cat(cp.exchange(flow))
    return model(*inputs, return_dict=False)[0]


def timed(model, inputs, cp, repeats: int) -> tuple[float, torch.Tensor]:
    out = step(model, inputs, cp)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if cp is not None:
            dist.barrier()
        start = time.perf_counter()
        out = step(model, inputs, cp)
        best = min(best, time.perf_counter() - start)
    return best, out


def rank_main(rank: int, world: int, port: int, layout: Layout, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    try:
        model, inputs = build(args)
        cp = ContextParallel(layout, "cpu")
        if layout.sequence > 1:
            model.enable_parallelism(cp)
        seconds, out = timed(model, inputs, cp, args.repeats)
        if rank == 0:
            results.put((seconds, out))
    finally:
        dist.destroy_process_group()


def run_parallel(layout: Layout, args: argparse.Namespace) -> tuple[float, torch.Tensor]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(rank_main, (layout.world, port, layout, args, results), nprocs=layout.world,
                       start_method="spawn", join=False)  # fmt: skip
    return results.get(timeout=3600)


def cpu_table(args: argparse.Namespace) -> None:
    tokens = args.frames * args.latent[0] * args.latent[1] // 4
    print(f"## CPU, one thread per process: {args.layers} layers, {args.heads}x64 heads, {tokens} video tokens, CFG on")
    torch.set_num_threads(1)
    model, inputs = build(args)
    base, reference = timed(model, inputs, None, args.repeats)
    print("| layout | processes | step (s) | speed-up | max abs diff vs N=1 |")
    print("|---|---|---|---|---|")
    print(f"| one process | 1 | {base:.3f} | 1.00x | - |")
    for layout in (Layout(ulysses=2), Layout(ring=2), Layout(cfg=2)):
        seconds, out = run_parallel(layout, args)
        diff = float((out - reference).abs().max())
        print(f"| {layout.describe().split(': ')[1]} | 2 | {seconds:.3f} | {base / seconds:.2f}x | {diff:.1e} |")


def h100_model(args: argparse.Namespace) -> None:
    """FLOPs and all-to-all bytes of the 14B at 720p (2 latent frames of 90 x 160, patch 2: 7200 tokens), CFG 2."""
    d, ffn, layers, tokens, ctx, batch, bf16 = 5120, 13824, 40, 2 * 45 * 80, 257 + 512, 2, 2
    per_token_layer = 2 * (4 * d * d + 2 * d * d + 2 * d * ffn) + 4 * tokens * d + 4 * ctx * d  # K/V cached
    flops = per_token_layer * tokens * batch * layers
    print(f"\n## 8 x H100 model, 720p plain edit: {flops / 1e12:.0f} TFLOP per step (CFG batch 2), "
          f"{args.tflops:.0f} TFLOP/s sustained per GPU, all-to-all {args.a2a_gbps:.0f} GB/s per GPU, "
          "no overlap")  # fmt: skip
    print("| GPUs | layout | compute (s) | all-to-all per layer (MB) | comm (s) | step (s) | speed-up | 50 steps (s) |")
    print("|---|---|---|---|---|---|---|---|")
    one = flops / (args.tflops * 1e12)
    for n in (1, 2, 4, 8):
        for cfg in (1, 2) if n > 1 else (1,):
            seq = n // cfg
            compute = one / n
            # q, k, v in and the output back: 4 tensors of [batch/cfg, tokens/seq, D] per rank, (seq-1)/seq leaves
            moved = 4 * (batch // cfg) * (tokens / seq) * d * bf16 * (seq - 1) / seq
            comm = moved * layers / (args.a2a_gbps * 1e9)
            total = compute + comm
            name = ("CFG 2 x " if cfg == 2 else "") + (f"Ulysses {seq}" if seq > 1 else "") or "one GPU"
            print(f"| {n} | {name.removesuffix(' x ')} | {compute:.3f} | {moved / 1e6:.1f} | {comm:.3f} | "
                  f"{total:.3f} | {one / total:.2f}x | {50 * total:.1f} |")  # fmt: skip
    print("\nPublished: cache-dit on ChronoEdit, 4 x L20: Ulysses-2 2.4x, Ulysses-4 3.9x (+DBCache 8.7-9.3x); "
          "diffusers Ulysses on 2 x L20 ~1.85x; NVIDIA runs one edit on 8 GPUs (xDiT Ulysses x ring), no figure.")


def main() -> None:
    args = parse_args()
    cpu_table(args)
    h100_model(args)


if __name__ == "__main__":
    main()
