"""Rows per second of ``chronoedit batch`` on 1 and 2 ranks (``torchrun``, data parallel, CPU, one thread per rank).

What it measures: a small random checkpoint (``--layers`` blocks of 4 heads x 128, ffn ``--ffn``) at ``--size``
pixels square and ``--steps`` steps, so that the transformer takes most of a row's time (its share is measured first,
in this process, with one thread: forward hooks on the transformer against the row's generate time). Then the same
``--rows``-row manifest runs under ``torchrun --standalone --nproc_per_node=N -m chronoedit batch`` for each N, with
``OMP_NUM_THREADS=1`` per process, into a fresh folder. Throughput is rows / (last sidecar's ``finished_at`` - first
sidecar's ``started_at``): the steady state, without interpreter start and model load (shown apart as the wall time).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_parallel_batch.py [--rows 16 --size 128 --steps 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL import Image

from chronoedit.batch import Batch, run_batch
from chronoedit.demo import TinySpec, build_tiny_checkpoint
from chronoedit.editing import EditRunner, EditSettings, resolve_model


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="output height and width (multiple of 16)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    return parser.parse_args()


def make_manifest(folder: Path, rows: int) -> Path:
    lines = []
    for i in range(rows):
        Image.new("RGB", (160, 128), (37 * i % 256, 100, 180)).save(folder / f"img{i}.png")
        lines.append(json.dumps({"id": f"r{i}", "input": f"img{i}.png", "prompt": f"edit number {i}", "seed": i}))
    path = folder / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def transformer_share(ckpt: Path, manifest: Path, args: argparse.Namespace, out: Path) -> tuple[float, float]:
    """(seconds per row, transformer share of the generate time) for two rows in this process on one thread."""
    torch.set_num_threads(1)
    spec = resolve_model(str(ckpt), device="cpu")
    runner = EditRunner(spec)
    pipe = runner.load()
    spent = [0.0]
    started: list[float] = []
    pipe.transformer.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    pipe.transformer.register_forward_hook(
        lambda *_: spent.__setitem__(0, spent[0] + time.perf_counter() - started.pop())
    )
    short = out / "m2.jsonl"
    short.write_text("".join(manifest.read_text().splitlines(keepends=True)[:2]))
    settings = EditSettings(height=args.size, width=args.size, num_inference_steps=args.steps)
    run_batch(Batch(manifest=short, out_dir=out / "share", model=spec, defaults=settings), quiet=True, runner=runner)
    generate = sum(json.loads(p.read_text())["timings"]["generate_s"] for p in (out / "share").glob("*.json"))
    return generate / 2, spent[0] / generate


def run_ranks(n: int, ckpt: Path, manifest: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    size, steps = str(args.size), str(args.steps)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "chronoedit",
            "batch", str(manifest), "--out", str(out), "--model-path", str(ckpt), "--device", "cpu", "--quiet",
            "--height", size, "--width", size, "--num-inference-steps", steps]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    sidecars = [json.loads(p.read_text()) for p in out.glob("r*.json")]
    assert len(sidecars) == args.rows, f"{len(sidecars)} of {args.rows} rows done"
    first = min(datetime.fromisoformat(s["started_at"]) for s in sidecars)
    last = max(datetime.fromisoformat(s["finished_at"]) for s in sidecars)
    per_rank = {s["worker"] for s in sidecars}
    return {"wall": wall, "rows_s": args.rows / (last - first).total_seconds(), "ranks_used": len(per_rank)}


def main() -> None:
    args = parse()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        spec = TinySpec(num_layers=args.layers, num_attention_heads=4, attention_head_dim=128, ffn_dim=args.ffn)
        ckpt = build_tiny_checkpoint(tmp_path / "ckpt", spec)
        manifest = make_manifest(tmp_path, args.rows)
        row_s, share = transformer_share(ckpt, manifest, args, tmp_path)
        print(f"model: {args.layers} blocks, D=512 (4 heads x 128), ffn {args.ffn}; {args.size}x{args.size} px, "
              f"{args.steps} steps, CFG on; {args.rows} rows")  # fmt: skip
        print(f"one thread, in process: {row_s:.2f} s per row, transformer {100 * share:.0f}% of generate time")
        print()
        print(f"{'ranks':>5} | {'rows/s':>7} | {'speedup':>7} | {'ranks used':>10} | {'wall s (start+load+rows)':>24}")
        print(f"{'-' * 5}-+-{'-' * 7}-+-{'-' * 7}-+-{'-' * 10}-+-{'-' * 24}")
        base = None
        for n in args.ranks:
            result = run_ranks(n, ckpt, manifest, tmp_path / f"out{n}", args)
            base = base or result["rows_s"]
            print(f"{n:>5} | {result['rows_s']:>7.3f} | {result['rows_s'] / base:>6.2f}x | "
                  f"{result['ranks_used']:>10.0f} | {result['wall']:>24.1f}")  # fmt: skip
        print(f"\nmachine: {os.cpu_count()} CPU cores (shared with other work: figures are indicative)")


if __name__ == "__main__":
    main()
