"""Jobs per second of ``chronoedit serve`` with 1 and 2 CPU worker processes (``--devices cpu`` / ``cpu,cpu``).

What it measures: a mid-size random checkpoint (real diffusers layout; by default 4 layers, 8 heads x 128 = D 1024,
FFN 4096, tiny text/CLIP encoders and VAE, as in ``bench_pipeline.py``, where the transformer dominates the run
time) is built once under /tmp. For each worker count the server is built exactly as ``chronoedit serve --devices``
builds it (same flags, same code path; the HTTP client in this process), every worker process with one torch
thread (``OMP_NUM_THREADS=1``). After the models load, warm-up jobs run until every worker has run one (a fresh
process's first edit pays one-time costs); then ``--jobs`` edits are submitted at once and the wall time from the
first submit to the last job done gives jobs/s. ``edit s`` is the mean time a worker spent on one job (its
``total_s``), so ``jobs/s x edit s`` near the worker count means the workers were busy all the time.

On a machine shared with other work the figures vary; the CPU count and load average are printed with them.
Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_parallel_serve.py [--jobs 8 --size 192 --steps 4]``.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported: here and in every (spawned) worker process
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fastapi.testclient import TestClient
from serve_helpers import png_bytes, submit

from chronoedit import cli
from chronoedit.commands.serve import build_state
from chronoedit.demo import TinySpec, build_tiny_checkpoint
from chronoedit.serve.app import create_app


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=8, help="timed edits per worker count")
    parser.add_argument("--size", type=int, default=192, help="output height and width (multiple of 16)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", default="1,2", help="worker counts to run")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ffn-dim", type=int, default=4096)
    return parser.parse_args()


def checkpoint(args: argparse.Namespace) -> Path:
    spec = TinySpec(num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                    ffn_dim=args.ffn_dim)  # fmt: skip
    root = Path(tempfile.gettempdir()) / f"chronoedit-bench-serve-{args.layers}x{args.heads}x{args.head_dim}"
    if not (root / "model_index.json").is_file():
        build_tiny_checkpoint(root, spec)
    return root


def wait(condition: Any, timeout: float = 1800.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise TimeoutError("the server did not get there in time")


def all_done(state: Any, ids: list[str]) -> list[Any]:
    jobs = [state.store.get(job_id) for job_id in ids]
    if any(job.status in ("failed", "cancelled") for job in jobs):
        raise RuntimeError(f"a job did not succeed: {[job.error for job in jobs if job.error]}")
    return jobs if all(job.status == "done" for job in jobs) else []


def run(ckpt: Path, workers: int, args: argparse.Namespace) -> dict[str, float]:
    """Jobs/s of a server with ``workers`` CPU worker processes."""
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as state_dir:
        return measure(ckpt, workers, args, Path(state_dir))


def measure(ckpt: Path, workers: int, args: argparse.Namespace, state_dir: Path) -> dict[str, float]:
    flags = ["serve", "--state-dir", str(state_dir), "--model-path", str(ckpt),
             "--height", str(args.size), "--width", str(args.size), "--num-inference-steps", str(args.steps),
             "--quiet", "--max-queue", "10000", "--devices", ",".join(["cpu"] * workers)]  # fmt: skip
    state = build_state(cli.parse_args(flags))
    state.worker.config = dataclasses.replace(state.worker.config, threads=1)
    image = png_bytes((args.size, args.size))
    with TestClient(create_app(state)) as client:
        health = lambda: client.get("/v1/health").json()["workers"]  # noqa: E731
        wait(lambda: all(w["state"] == "ready" for w in health()))
        while not all(w["jobs_run"] >= 1 for w in health()):  # warm every worker up
            warm = [submit(client, {"prompt": "warm", "seed": i}, image=image).json()["id"] for i in range(workers)]
            wait(lambda ids=warm: all_done(state, ids))
        start = time.perf_counter()
        ids = [submit(client, {"prompt": f"edit {i}", "seed": i}, image=image).json()["id"] for i in range(args.jobs)]
        jobs = wait(lambda: all_done(state, ids))
        wall = time.perf_counter() - start
        ran = {job.worker.split("@")[0] for job in jobs}
    state.store.close()
    edit_s = statistics.mean(job.timings["total_s"] for job in jobs)
    return {"workers": workers, "wall": wall, "jobs_s": args.jobs / wall, "edit_s": edit_s, "used": len(ran)}


def main() -> None:
    args = parse()
    ckpt = checkpoint(args)
    counts = [int(n) for n in args.workers.split(",")]
    print(f"chronoedit serve --devices cpu x N: {args.jobs} jobs of {args.size}x{args.size}, {args.steps} steps, "
          f"model {args.layers} layers x {args.heads} heads x {args.head_dim}, 1 thread per worker; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
    rows = [run(ckpt, n, args) for n in counts]
    base = rows[0]["jobs_s"]
    print(f"{'workers':>7} {'wall s':>8} {'jobs/s':>8} {'speedup':>8} {'edit s':>8} {'busy':>6} {'used':>5}")
    for row in rows:
        busy = row["jobs_s"] * row["edit_s"] / row["workers"]
        print(f"{row['workers']:>7} {row['wall']:>8.2f} {row['jobs_s']:>8.3f} {row['jobs_s'] / base:>7.2f}x "
              f"{row['edit_s']:>8.2f} {busy:>6.0%} {row['used']:>5}")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
