"""Throughput of ``chronoedit serve`` and its overhead per job beyond the pipeline's own time.

What it measures (demo model, CPU, fp32; ``--size`` pixels square, ``--steps`` steps, ``--jobs`` edits):
1. ``direct``: the same edits run back to back in this process through the runner the server uses (validation,
   pipeline, writing the result) with no HTTP, no queue: the floor.
2. ``server``: the real ``chronoedit serve`` in its own process on 127.0.0.1 (as deployed, so the clients here
   share no interpreter lock with it); ``--jobs`` edits submitted at once by ``--clients`` threads over HTTP
   (multipart upload), then the last one is polled every 50 ms until done (jobs run in order). Throughput is
   jobs / wall time from the first submit to the last job done.
3. ``idle latency``: one job submitted to an idle server, polled every 10 ms: submit -> done, next to the job's own
   pipeline time; and how many status requests per second one client gets.
Overhead per job = server wall time / jobs - direct wall time / jobs (HTTP, upload decode, SQLite queue, polling
load); the worker's own split (prepare / generate / write) is printed from the jobs' timings.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_serve.py [--jobs 50 --size 32 --steps 2]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import httpx
from PIL import Image
from serve_helpers import free_port, png_bytes, submit, wait_ready

from chronoedit import cli
from chronoedit.commands.serve import build_state
from chronoedit.editing import wants_trajectory, write_outputs
from chronoedit.media import save_image
from chronoedit.serve.editing import INPUT_NAME, build_job
from chronoedit.serve.options import EditOptions


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--clients", type=int, default=50, help="threads submitting at once")
    parser.add_argument("--size", type=int, default=32, help="output height and width (multiple of 16)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="direct/server pairs, alternating; the best is shown")
    return parser.parse_args()


def serve_flags(state_dir: Path, args: argparse.Namespace) -> list[str]:
    return ["serve", "--state-dir", str(state_dir), "--height", str(args.size), "--width", str(args.size),
            "--num-inference-steps", str(args.steps), "--device", "cpu", "--quiet", "--max-queue", "100000"]


@contextlib.contextmanager
def server_process(flags: list[str]):  # type: ignore[no-untyped-def]
    """``chronoedit serve`` in a subprocess on a free port; yields its URL once the model is loaded."""
    port = free_port()
    command = [sys.executable, "-m", "chronoedit.cli", *flags, "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"chronoedit serve exited: {process.stderr.read()}")
            with contextlib.suppress(httpx.HTTPError), httpx.Client(base_url=url, timeout=120) as http:
                wait_ready(http)
                break
            if time.monotonic() > deadline:
                raise TimeoutError("chronoedit serve did not come up")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def run_direct(state, jobs: int, work: Path) -> float:  # type: ignore[no-untyped-def]
    """Seconds for ``jobs`` edits through the server's runner, no HTTP/queue (validation + pipeline + write), as the
    worker runs them: the job resolved on the server's model and defaults, run, its outputs written."""
    worker = state.worker
    worker.runner.load()
    image = png_bytes()
    start = time.perf_counter()
    for i in range(jobs):
        job_dir = work / f"direct{i}"
        job_dir.mkdir(parents=True)
        save_image(Image.open(io.BytesIO(image)).convert("RGB"), job_dir / INPUT_NAME)
        options = EditOptions(prompt=f"edit {i}", seed=i)
        edit, plan = build_job(worker.runner.spec, worker.defaults, options, job_dir, state.limits)
        out = worker.runner.run(edit, wants_trajectory(edit, plan))
        write_outputs(edit, plan, out)
    return time.perf_counter() - start


def run_server(url: str, jobs: int, clients: int) -> tuple[float, list[dict]]:
    """Submit ``jobs`` at once from ``clients`` threads; poll the last one every 50 ms (jobs run in order)."""
    with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        wait_ready(http)
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            ids = list(pool.map(lambda i: submit(http, {"prompt": f"edit {i}", "seed": i}).json()["id"], range(jobs)))
        last = max((http.get(f"/v1/edits/{i}").json() for i in ids), key=lambda s: s["position"] or 0)["id"]
        while not http.get(f"/v1/edits/{last}").json()["finished"]:
            time.sleep(0.05)
        wall = time.perf_counter() - start
        return wall, [http.get(f"/v1/edits/{i}").json() for i in ids]


def status_rate(url: str, job_id: str, seconds: float = 2.0) -> float:
    """Status requests per second one client gets from an idle server."""
    with httpx.Client(base_url=url, timeout=30) as http:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            http.get(f"/v1/edits/{job_id}").raise_for_status()
            count += 1
        return count / (time.perf_counter() - start)


def idle_latency(url: str) -> tuple[float, dict]:
    with httpx.Client(base_url=url, timeout=120) as http:
        start = time.perf_counter()
        job_id = submit(http, {"prompt": "one", "seed": 1}).json()["id"]
        while not (status := http.get(f"/v1/edits/{job_id}").json())["finished"]:
            time.sleep(0.01)
        return time.perf_counter() - start, status


def main() -> None:
    args = parse()
    threading.current_thread().name = "bench"
    with tempfile.TemporaryDirectory() as tmp:
        state = build_state(cli.parse_args(serve_flags(Path(tmp) / "direct-state", args)))  # its worker never starts
        direct, server, statuses = [], [], []
        with server_process(serve_flags(Path(tmp) / "state", args)) as url:
            for r in range(args.rounds):  # alternating, so load from elsewhere hits both alike
                direct.append(run_direct(state, args.jobs, Path(tmp) / f"direct{r}"))
                wall, round_statuses = run_server(url, args.jobs, args.clients)
                server.append(wall)
                statuses += round_statuses
            latency_s, one = idle_latency(url)
            rate = status_rate(url, one["id"])
    direct_s, server_s = min(direct), min(server)
    assert all(s["status"] == "done" for s in statuses), [s["error"] for s in statuses if s["status"] != "done"]
    mean = {k: statistics.mean(s["timings"][k] for s in statuses) for k in ("prepare_s", "generate_s", "write_s")}
    import torch

    print(f"chronoedit serve, demo model, {args.size}x{args.size}, {args.steps} steps, {args.jobs} jobs, "
          f"{args.clients} clients, best of {args.rounds} rounds, torch threads {torch.get_num_threads()}\n")
    print(f"{'run':<34}{'wall s':>9}{'jobs/s':>9}{'s/job':>9}   all rounds (s)")
    for name, walls in (("direct (runner, no HTTP/queue)", direct), ("server (HTTP + SQLite queue)", server)):
        wall = min(walls)
        rounds = " ".join(f"{w:.2f}" for w in walls)
        print(f"{name:<34}{wall:>9.2f}{args.jobs / wall:>9.2f}{wall / args.jobs:>9.3f}   {rounds}")
    overhead = server_s / args.jobs - direct_s / args.jobs
    print(f"\nserver / direct time ratio: {server_s / direct_s:.3f}; overhead per job: {overhead * 1000:+.1f} ms")
    print("worker's split per job (mean): " + ", ".join(f"{k[:-2]} {v * 1000:.1f} ms" for k, v in mean.items()))
    print(f"idle latency (submit -> done seen, 10 ms polling): {latency_s * 1000:.0f} ms, of which pipeline "
          f"{one['timings']['generate_s'] * 1000:.0f} ms")  # fmt: skip
    print(f"status requests (GET /v1/edits/ID, one client, idle server): {rate:.0f}/s")
    print(json.dumps({"jobs_per_s": args.jobs / server_s, "direct_jobs_per_s": args.jobs / direct_s,
                      "overhead_ms_per_job": overhead * 1000}))  # fmt: skip


if __name__ == "__main__":
    main()
