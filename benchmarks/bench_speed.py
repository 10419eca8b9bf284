"""Speed modes of our pipeline against diffusers' reference, side by side in one process, fp32, identical weights.

1. Exact modes (same output): our pipeline with each speed-up off and on — ``cfg-batch`` (both CFG branches in one
   forward), ``kv-once`` (cross-attention keys/values of the text and CLIP tokens once per edit) and both (our
   default) — next to diffusers' ``ChronoEditPipeline``; the runs alternate, best of ``--repeats``. Columns: wall
   time, ratio to the reference, max |ours - reference| of the output frames.
2. Real width (``--real-block``): one transformer block at the 14B's width (40 x 128 heads, FFN 13824) at the token
   count of a 720p 2-frame edit (2 x 45 x 80 = 7200 video tokens; ``--real-tokens`` to change), CFG as one batch of
   2 vs two passes, our block vs diffusers' block; GFLOP/s vs the machine's fp32 matmul rate.
3. Step caches over ``--cache-steps`` (50) steps with CFG: transformer branch-forwards that ran every block (of
   2 x steps), forwards saved, wall time ratio to the uncached run, and the deviation of the final latents from the
   uncached run (max abs, and relative: mean |diff| / mean |uncached|).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_speed.py`` (``--help`` for the knobs). Reuses the checkpoint
cache of ``bench_pipeline.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from bench_pipeline import ensure_checkpoint, load_pipelines, matmul_gflops
from bench_pipeline import parse_args as pipeline_args

EXACT_MODES = {  # name -> (cfg_batch, reuse_context_kv)
    "ours: no speed-ups": (False, False),
    "ours: cfg-batch": (True, False),
    "ours: kv-once": (False, True),
    "ours: cfg-batch + kv-once (default)": (True, True),
}
CACHES = ("first-block:0.02", "first-block:0.05", "first-block:0.1", "first-block:0.2", "taylorseer:3",
          "taylorseer:5")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--skip-exact", action="store_true")
    own.add_argument("--skip-caches", action="store_true")
    own.add_argument("--real-block", action="store_true", help="also time one real-width block (slow on a CPU)")
    own.add_argument("--compile", action="store_true", help="also time --compile (compile time, then best run)")
    own.add_argument("--real-tokens", type=int, default=2 * 45 * 80)
    own.add_argument("--real-reps", type=int, default=1)
    own.add_argument("--cache-steps", type=int, default=50)
    own.add_argument("--cache-size", type=int, default=128, help="height and width of the cache runs")
    known, rest = own.parse_known_args(argv)
    args = pipeline_args(rest)
    return argparse.Namespace(**vars(args), **vars(known))


def call(pipe: Any, args: argparse.Namespace, image: Any, **extra: Any) -> tuple[float, np.ndarray]:
    kwargs = {"image": image, "prompt": "The cup slowly tips over", "height": args.height, "width": args.width,
              "num_frames": 5, "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale,
              "generator": torch.Generator("cpu").manual_seed(args.seed), "output_type": "np", **extra}  # fmt: skip
    start = time.perf_counter()
    with torch.no_grad():
        frames = pipe(**kwargs).frames
    return time.perf_counter() - start, np.asarray(frames, dtype=np.float64)


def bench_exact(ours: Any, ref: Any, args: argparse.Namespace, image: Any) -> None:
    runs: dict[str, list[tuple[float, np.ndarray]]] = {name: [] for name in ["reference", *EXACT_MODES]}

    def one(name: str) -> tuple[float, np.ndarray]:
        if name == "reference":
            return call(ref, args, image)
        cfg_batch, kv_once = EXACT_MODES[name]
        ours.reuse_context_kv = kv_once
        return call(ours, args, image, cfg_batch=cfg_batch)

    names = list(runs)
    for name in names:  # warm-up
        one(name)
    for rep in range(args.repeats):
        for name in names if rep % 2 == 0 else reversed(names):
            runs[name].append(one(name))
            print(f"  {name:<38} {runs[name][-1][0]:6.2f} s", flush=True)
    ours.reuse_context_kv = True
    if args.compile:
        compile_runs(ours, args, image, runs)
    ref_time, ref_frames = min(t for t, _ in runs["reference"]), runs["reference"][0][1]
    print(f"\nExact modes: {args.height}x{args.width}, 5 frames, {args.steps} steps, CFG {args.guidance_scale}; "
          f"best of {args.repeats}:\n")  # fmt: skip
    print("| mode | s | ratio to reference | max abs diff vs reference |")
    print("|---|---:|---:|---:|")
    for name, results in runs.items():
        best = min(t for t, _ in results)
        diff = max(float(np.abs(f - ref_frames).max()) for _, f in results)
        print(f"| {name} | {best:.2f} | {best / ref_time:.2f} | {diff:.2g} |")


def compile_runs(ours: Any, args: argparse.Namespace, image: Any, runs: dict[str, list]) -> None:
    """``--compile`` on top of the default modes: the first call pays the compile; then best of ``--repeats``."""
    from chronoedit.speed.compile import compile_blocks

    compile_blocks(ours.transformer)
    first, _ = call(ours, args, image)
    name = "ours: default + compile"
    runs[name] = [call(ours, args, image) for _ in range(args.repeats)]
    print(f"  {name:<38} first call (compiles) {first:6.2f} s, then {min(t for t, _ in runs[name]):6.2f} s")


def bench_real_block(args: argparse.Namespace) -> None:
    """One block at real width: ours vs diffusers', CFG batched (batch 2) vs two passes of batch 1."""
    from diffusers.models.transformers.transformer_chronoedit import WanTransformerBlock

    from chronoedit.model import TransformerConfig
    from chronoedit.model.transformer import TransformerBlock

    cfg = TransformerConfig(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=1,
                            image_dim=1280, added_kv_proj_dim=5120, text_dim=4096)  # fmt: skip
    dim, tokens = cfg.inner_dim, args.real_tokens
    torch.manual_seed(0)
    ours = TransformerBlock(cfg).eval()
    ref = WanTransformerBlock(dim, cfg.ffn_dim, 40, "rms_norm_across_heads", True, 1e-6, dim).eval()
    ref.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, tokens, dim, generator=gen)
    context = torch.randn(2, 257 + 512, dim, generator=gen)
    t_mod = torch.randn(2, 6, dim, generator=gen)
    angles = torch.randn(1, tokens, 1, 64, generator=gen)
    rope_ours = (angles.cos(), angles.sin())
    rope_ref = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))
    flops = 2 * tokens * (4 * dim * dim + 2 * dim * cfg.ffn_dim) + 4 * tokens * dim * (tokens + 769)
    flops += 2 * 769 * 4 * dim * dim + 2 * tokens * dim * dim  # cross-attention K/V and query projections
    matmul = matmul_gflops(args.matmul_size, args.matmul_reps, "cpu", "min")
    rows = []
    with torch.no_grad():
        for name, block, rope in (("ours", ours, rope_ours), ("reference", ref, rope_ref)):
            for mode in ("cfg-batch (batch 2)", "two passes"):
                times = []
                for _ in range(args.real_reps):
                    start = time.perf_counter()
                    if mode.startswith("cfg"):
                        block(x, context, t_mod, rope)
                    else:
                        for i in range(2):
                            block(x[i : i + 1], context[i : i + 1], t_mod[i : i + 1], rope)
                    times.append(time.perf_counter() - start)
                rows.append((name, mode, min(times)))
                print(f"  real block {name} {mode}: {min(times):.2f} s", flush=True)
        if args.compile:
            compiled = torch.compile(ours)
            start = time.perf_counter()
            compiled(x, context, t_mod, rope_ours)
            print(f"  real block ours compiled: first call (compiles) {time.perf_counter() - start:.2f} s", flush=True)
            times = []
            for _ in range(args.real_reps):
                start = time.perf_counter()
                compiled(x, context, t_mod, rope_ours)
                times.append(time.perf_counter() - start)
            rows.append(("ours, compiled", "cfg-batch (batch 2)", min(times)))
    print(f"\nOne block at real width (D {dim}, FFN {cfg.ffn_dim}), {tokens} video tokens, both CFG branches; "
          f"fp32 matmul {matmul:.1f} GFLOP/s:\n")  # fmt: skip
    print("| block | CFG | s | GFLOP/s | efficiency vs matmul |")
    print("|---|---|---:|---:|---:|")
    for name, mode, seconds in rows:
        rate = 2 * flops / seconds / 1e9
        print(f"| {name} | {mode} | {seconds:.2f} | {rate:.1f} | {rate / matmul:.0%} |")


def bench_caches(ours: Any, args: argparse.Namespace, image: Any) -> None:
    settings = argparse.Namespace(**{**vars(args), "steps": args.cache_steps, "height": args.cache_size,
                                     "width": args.cache_size})  # fmt: skip
    full = [0]
    handle = ours.transformer.blocks[-1].ffn.register_forward_hook(lambda *_: full.__setitem__(0, full[0] + 1))
    rows = []
    try:
        for index, cache in enumerate((None, None, *CACHES)):  # the first run warms up (allocator, kernels): dropped
            full[0] = 0
            extra = {"cache": cache, "output_type": "latent"} if cache else {"output_type": "latent"}
            start = time.perf_counter()
            with torch.no_grad():
                kwargs = {"image": image, "prompt": "The cup slowly tips over", "height": settings.height,
                          "width": settings.width, "num_frames": 5, "num_inference_steps": settings.steps,
                          "guidance_scale": args.guidance_scale,
                          "generator": torch.Generator("cpu").manual_seed(args.seed), **extra}  # fmt: skip
                latents = ours(**kwargs).frames.double()
            rows.append((cache or "none", full[0], time.perf_counter() - start, latents))
            if index == 0:
                rows.pop()
                continue
            print(f"  cache {cache or 'none':<18} full forwards {full[0]:4d}  {rows[-1][2]:6.2f} s", flush=True)
    finally:
        handle.remove()
    base_calls, base_time, base = rows[0][1], rows[0][2], rows[0][3]
    print(f"\nStep caches: {settings.height}x{settings.width}, 5 frames, {settings.steps} steps, CFG "
          f"{args.guidance_scale} (uncached: one batched forward per step = {base_calls} branch-forwards); each "
          "cache runs the branches as two passes with a state each:\n")  # fmt: skip
    print("| cache | branch-forwards with all blocks | of | saved | time ratio to uncached | max abs dev | rel dev |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, calls, seconds, latents in rows:
        total = 2 * settings.steps
        done = calls if name != "none" else total
        dev = (latents - base).abs()
        print(f"| {name} | {done} | {total} | {1 - done / total:.0%} | {seconds / base_time:.2f} "
              f"| {dev.max().item():.3g} | {(dev.mean() / base.abs().mean()).item():.3g} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from chronoedit.demo import draw_example_image

    args = parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    image = draw_example_image()
    if not (args.skip_exact and args.skip_caches):
        ours, ref = load_pipelines(ensure_checkpoint(args), "cpu")
        if not args.skip_exact:
            print("\n[exact modes]", flush=True)
            bench_exact(ours, ref, args, image)
        if not args.skip_caches:
            print("\n[step caches]", flush=True)
            bench_caches(ours, args, image)
    if args.real_block:
        print("\n[real-width block]", flush=True)
        bench_real_block(args)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
