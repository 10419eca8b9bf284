"""Benchmark our ChronoEdit pipeline against diffusers' reference, in one process, on identical random weights.

What it measures
----------------
1. A mid-size random checkpoint (real diffusers folder layout; by default 4 layers, 8 heads x 128 = D 1024,
   FFN 4096, tiny text/CLIP encoders, VAE base_dim 8) is built once into a cache under /tmp (or ``--ckpt``) and
   loaded by both pipelines. The transformer dominates the run time: its share of every timed run (time inside
   ``transformer.forward`` / wall time of the call) is printed.
2. Whole pipeline calls at 192x192, 4 steps, CFG 5, ours and diffusers' in alternating order, ``--repeats`` timed
   runs after ``--warmup`` untimed runs each, in two modes: ``plain`` (5-frame edit) and ``reasoning`` (29 frames =
   8 latent frames, the reasoning frames dropped after half the steps).
3. Peak memory of each call: on CPU the process RSS sampled by a background thread every 5 ms, reported as peak
   minus the RSS just before the call (RSS-based: it includes allocator caching, so it is coarser than a device
   counter); on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
4. Transformer forward throughput of both models: FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``
   (the CPU flash-attention kernel is added to its table when missing) on one forward at the benchmark's shapes
   (2 and 8 latent frames, batch 1 = one CFG branch) divided by the forward time, next to the GFLOP/s of a large
   fp32 matmul measured in the same run.
5. The max abs difference between the two pipelines' outputs in each mode (should be ~0; guards the comparison).

How to read it
--------------
``time ratio`` and ``memory ratio`` are ours / reference: below 1 means we are faster / leaner. Times are the best
of the timed runs by default (``--stat median`` for medians): on a shared machine other load only ever adds time, so
the minimum is the steadiest estimate. ``cpu use`` (process CPU time / (wall x threads)) flags starved runs: well
below 100% means the numbers are contaminated by other load; rerun. ``efficiency`` is forward GFLOP/s over matmul
GFLOP/s: how close the forward gets to the machine's dense-matmul rate (attention, norms and elementwise ops keep it
below 1; small matmuls can exceed a large one's rate when they fit in cache).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_pipeline.py`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

MODES = ("plain", "reasoning")
PROMPT = "The cup slowly tips over and the coffee spills onto the wooden table"
PLAIN_FRAMES = 5
CLIP_TOKENS = 257  # 224 / 14 = 16 -> 16 * 16 patches + class token
TEXT_TOKENS = 512
STATS: dict[str, Callable[[list[float]], float]] = {"min": min, "median": statistics.median}


# --------------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--ckpt", type=Path, default=None, help="checkpoint folder to use (built there if missing)")
    add("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "chronoedit-bench", help="checkpoint cache")
    add("--layers", type=int, default=4)
    add("--heads", type=int, default=8)
    add("--head-dim", type=int, default=128)
    add("--ffn-dim", type=int, default=4096)
    add("--text-dim", type=int, default=32)
    add("--image-dim", type=int, default=32)
    add("--vae-base-dim", type=int, default=8)
    add("--height", type=int, default=192)
    add("--width", type=int, default=192)
    add("--steps", type=int, default=4, help="denoising steps in both modes")
    add("--reasoning-frames", type=int, default=29)
    add("--reasoning-steps", type=int, default=None, help="steps with reasoning frames (default: half the steps)")
    add("--guidance-scale", type=float, default=5.0)
    add("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    add("--repeats", type=int, default=2, help="timed runs per pipeline and mode")
    add("--warmup", type=int, default=1, help="untimed runs per pipeline and mode before timing")
    add("--fwd-reps", type=int, default=3, help="timed transformer forwards per shape and model")
    add("--matmul-size", type=int, default=2048)
    add("--matmul-reps", type=int, default=10)
    add("--skip-flops", action="store_true", help="skip the forward GFLOP/s section")
    add("--device", default="cpu", help="cpu or cuda (falls back to cpu when CUDA is unavailable)")
    add("--seed", type=int, default=0)
    add("--stat", choices=sorted(STATS), default="min", help="how repeated timings are summarised (min = best of N)")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in args.modes if m not in MODES]:
        parser.error(f"unknown modes {unknown}; choose from {MODES}")
    if args.reasoning_steps is None:
        args.reasoning_steps = args.steps // 2
    if min(args.steps, args.repeats, args.fwd_reps, args.matmul_reps) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats, --fwd-reps and --matmul-reps must be >= 1, --warmup >= 0")
    if not 0 <= args.reasoning_steps <= args.steps:
        parser.error(f"--reasoning-steps must be between 0 and --steps ({args.steps})")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: running on cpu")
        args.device = "cpu"
    return args


# ------------------------------------------------------------------------------------------------------- checkpoint
def make_spec(args: argparse.Namespace) -> Any:
    from chronoedit.demo import TinySpec

    return TinySpec(
        num_layers=args.layers,
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        ffn_dim=args.ffn_dim,
        text_dim=args.text_dim,
        image_dim=args.image_dim,
        vae_base_dim=args.vae_base_dim,
        seed=args.seed,
    )


def ensure_checkpoint(args: argparse.Namespace) -> Path:
    """Reuse a complete checkpoint (``model_index.json`` present) or build one atomically (tmp dir + rename)."""
    from chronoedit.demo import build_tiny_checkpoint

    spec = make_spec(args)
    if args.ckpt is not None:
        target = args.ckpt.expanduser()
    else:
        digest = hashlib.sha1(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:10]
        target = args.cache_dir / f"ckpt-{digest}"
    if (target / "model_index.json").is_file():
        print(f"checkpoint: reusing {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build_tiny_checkpoint(tmp, spec)
        if target.exists() and not any(target.iterdir()):
            target.rmdir()
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"checkpoint: built {target} in {time.perf_counter() - start:.1f} s ({spec})")
    return target


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence diffusers/transformers warnings and loading bars (for the rest of the process)."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    for lib in (d_logging, t_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    yield


def load_pipelines(root: Path, device: str) -> tuple[Any, Any]:
    """Our pipeline and diffusers' reference, both from ``root``, both fp32 on ``device``."""
    import diffusers

    from chronoedit import ChronoEditPipeline

    with quiet_libraries():
        ours = ChronoEditPipeline.from_pretrained(str(root)).to(device)
        ref_transformer = diffusers.ChronoEditTransformer3DModel.from_pretrained(str(root), subfolder="transformer")
        ref = diffusers.ChronoEditPipeline.from_pretrained(str(root), transformer=ref_transformer).to(device)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    ours.transformer.eval()
    ref.transformer.eval()
    return ours, ref


# ----------------------------------------------------------------------------------------------------------- memory
def rss_reader() -> Callable[[], int]:
    """A function returning the process RSS in bytes: psutil if installed, else /proc/self/statm."""
    try:
        import psutil

        process = psutil.Process()
        return lambda: process.memory_info().rss
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm", encoding="ascii") as fh:
                return int(fh.read().split()[1]) * page

        return read


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next baseline RSS is comparable."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class PeakMemory:
    """Peak memory of a block above its start, in bytes: sampled RSS on CPU, the allocator's peak on CUDA."""

    device: str
    interval: float = 0.005
    peak_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> PeakMemory:
        release_memory()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._read = rss_reader()
        self._base = self._peak = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._read())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._peak, self._read()) - self._base


# ------------------------------------------------------------------------------------------------------ timing aids
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class ForwardTimer:
    """Accumulates the wall time spent inside a module's forward (via hooks) while attached."""

    def __init__(self, module: torch.nn.Module, device: str) -> None:
        self.seconds, self._start, self._device = 0.0, 0.0, device
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        sync(self._device)
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        sync(self._device)
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# -------------------------------------------------------------------------------------------------- pipeline runs
@dataclass
class Run:
    seconds: float
    peak_mb: float
    transformer_seconds: float
    cpu_seconds: float  # process CPU time (all threads) during the call
    frames: np.ndarray

    @property
    def cpu_use(self) -> float:
        """CPU time / (wall time x torch threads): well below 1 means the run was starved by other load."""
        return self.cpu_seconds / (self.seconds * torch.get_num_threads())


@dataclass
class ModeResult:
    mode: str
    ours: list[Run]
    ref: list[Run]

    @staticmethod
    def summary(runs: list[Run], key: str, stat: str) -> float:
        return STATS[stat]([getattr(run, key) for run in runs])

    def max_abs_diff(self) -> float:
        """Largest |ours - reference| over the timed repeats (each pair ran with the same seed)."""
        return max(
            float(np.abs(a.frames.astype(np.float64) - b.frames).max())
            for a, b in zip(self.ours, self.ref, strict=True)
        )

    def transformer_share(self, runs: list[Run]) -> float:
        return sum(r.transformer_seconds for r in runs) / sum(r.seconds for r in runs)


def call_kwargs(mode: str, args: argparse.Namespace, image: Any) -> dict[str, Any]:
    """Identical call arguments for both pipelines (explicit sizes, frames and reasoning steps; seeded generator)."""
    reasoning = mode == "reasoning"
    return {
        "image": image,
        "prompt": PROMPT,
        "height": args.height,
        "width": args.width,
        "num_frames": args.reasoning_frames if reasoning else PLAIN_FRAMES,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(args.seed),
        "output_type": "np",
        "enable_temporal_reasoning": reasoning,
        "num_temporal_reasoning_steps": args.reasoning_steps if reasoning else 0,
    }


def run_once(pipe: Any, kwargs: dict[str, Any], device: str) -> Run:
    """One seeded pipeline call: wall time, peak memory above the start, time inside the transformer, frames."""
    timer = ForwardTimer(pipe.transformer, device)
    try:
        with PeakMemory(device) as memory, torch.no_grad():
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            frames = pipe(**kwargs).frames
            sync(device)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        timer.remove()
    frames = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    return Run(seconds, memory.peak_bytes / 2**20, timer.seconds, cpu_seconds, frames)


def bench_mode(mode: str, ours: Any, ref: Any, args: argparse.Namespace, image: Any) -> ModeResult:
    """Warm-ups, then ``repeats`` rounds in alternating order (ours first on even rounds, reference first on odd)."""
    pipes = {"ours": ours, "ref": ref}
    for _ in range(args.warmup):
        for pipe in pipes.values():
            run_once(pipe, call_kwargs(mode, args, image), args.device)
    result = ModeResult(mode, [], [])
    for round_ in range(args.repeats):
        order = ("ours", "ref") if round_ % 2 == 0 else ("ref", "ours")
        for name in order:
            run = run_once(pipes[name], call_kwargs(mode, args, image), args.device)
            getattr(result, name).append(run)
            print(
                f"  {mode:<9} round {round_} {name:<4} {run.seconds:7.2f} s  peak {run.peak_mb:7.1f} MB  "
                f"transformer {run.transformer_seconds / run.seconds:4.0%}  cpu use {run.cpu_use:4.0%}",
                flush=True,
            )
    return result


def print_pipeline_tables(results: list[ModeResult], args: argparse.Namespace) -> None:
    memory_kind = "CUDA max_memory_allocated" if args.device == "cuda" else "process RSS sampled every 5 ms"
    how = "best" if args.stat == "min" else "median"
    print(f"\nPipeline runs: time = {how} of {args.repeats} timed runs; peak memory = median over runs of "
          f"({memory_kind}) peak minus its value just before the call:\n")  # fmt: skip
    print("| mode | ours s | reference s | time ratio (ours/ref) | peak mem ours MB | peak mem reference MB "
          "| memory ratio (ours/ref) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for res in results:
        t_ours, t_ref = res.summary(res.ours, "seconds", args.stat), res.summary(res.ref, "seconds", args.stat)
        m_ours, m_ref = res.summary(res.ours, "peak_mb", "median"), res.summary(res.ref, "peak_mb", "median")
        print(f"| {res.mode} | {t_ours:.2f} | {t_ref:.2f} | {_ratio(t_ours, t_ref)} | {m_ours:.0f} | {m_ref:.0f} "
              f"| {_ratio(m_ours, m_ref)} |")  # fmt: skip
    print("\nGuards: output agreement; transformer share = time in transformer.forward / wall time; cpu use = "
          "process CPU time / (wall x threads), lowest run (well below 100% = starved by other load):\n")  # fmt: skip
    print("| mode | max abs diff ours vs ref | transformer share ours | transformer share ref | cpu use ours "
          "| cpu use ref |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for res in results:
        cpu_ours, cpu_ref = min(r.cpu_use for r in res.ours), min(r.cpu_use for r in res.ref)
        print(f"| {res.mode} | {res.max_abs_diff():.3g} | {res.transformer_share(res.ours):.0%} "
              f"| {res.transformer_share(res.ref):.0%} | {cpu_ours:.0%} | {cpu_ref:.0%} |")  # fmt: skip


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


# --------------------------------------------------------------------------------------------- forward throughput
@dataclass
class FlopRow:
    model: str
    frames: int
    tokens: int
    flops: int
    seconds: float

    @property
    def gflops_per_s(self) -> float:
        return self.flops / self.seconds / 1e9


def flop_mapping() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode's table lacks the CPU flash-attention kernel (what SDPA runs on CPU): count it like SDPA."""
    from torch.utils.flop_counter import flop_registry, sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_registry:
        return {}

    def formula(query_shape: Any, key_shape: Any, value_shape: Any, *_: Any, **__: Any) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: formula}


def transformer_inputs(cfg: Any, frames: int, args: argparse.Namespace, factor: int) -> dict[str, Any]:
    """Seeded inputs at the pipeline's shapes: batch 1 (one CFG branch), ``frames`` latent frames."""
    gen = torch.Generator("cpu").manual_seed(args.seed)
    shape = (1, cfg.in_channels, frames, args.height // factor, args.width // factor)
    inputs = {
        "hidden_states": torch.randn(shape, generator=gen),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, cfg.text_dim, generator=gen),
        "encoder_hidden_states_image": torch.randn(1, CLIP_TOKENS, cfg.image_dim, generator=gen),
    }
    return {k: v.to(args.device) for k, v in inputs.items()} | {"return_dict": False}


@torch.no_grad()
def count_flops(model: torch.nn.Module, inputs: dict[str, Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        model(**inputs)
    return counter.get_total_flops()


@torch.no_grad()
def time_forwards(
    models: dict[str, torch.nn.Module], inputs: dict[str, Any], reps: int, device: str, stat: str
) -> dict[str, float]:
    """Forward seconds per model (``stat`` over ``reps``), the models alternating every repetition. No warm-up
    here: the FLOP-counting forward just before runs at the same shape."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(reps):
        names = list(models) if rep % 2 == 0 else list(reversed(models))
        for name in names:
            sync(device)
            start = time.perf_counter()
            models[name](**inputs)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: STATS[stat](values) for name, values in times.items()}


@torch.no_grad()
def matmul_gflops(size: int, reps: int, device: str, stat: str) -> float:
    """GFLOP/s (``stat`` over ``reps``) of an fp32 ``size x size @ size x size`` matmul (2 * size^3 FLOPs)."""
    gen = torch.Generator("cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / STATS[stat](times) / 1e9


def bench_flops(ours: Any, ref: Any, args: argparse.Namespace) -> tuple[list[FlopRow], float]:
    """Forward FLOPs and time of both transformers at 2 and the reasoning latent frames; the matmul reference is
    measured before and after the forwards and the better of the two is kept."""
    models = {"ours": ours.transformer, "reference": ref.transformer}
    cfg = ours.transformer.config
    factor = ours.vae_spatial_factor
    pt, ph, pw = cfg.patch_size
    matmul_before = matmul_gflops(args.matmul_size, args.matmul_reps, args.device, args.stat)
    rows = []
    for frames in sorted({2, (args.reasoning_frames - 1) // 4 + 1}):
        inputs = transformer_inputs(cfg, frames, args, factor)
        tokens = (frames // pt) * (args.height // factor // ph) * (args.width // factor // pw)
        flops = {name: count_flops(model, inputs) for name, model in models.items()}
        seconds = time_forwards(models, inputs, args.fwd_reps, args.device, args.stat)
        rows += [FlopRow(name, frames, tokens, flops[name], seconds[name]) for name in models]
        print(f"  forwards at {frames} latent frames done", flush=True)
    matmul_after = matmul_gflops(args.matmul_size, args.matmul_reps, args.device, args.stat)
    return rows, max(matmul_before, matmul_after)


def print_flop_table(rows: list[FlopRow], matmul: float, args: argparse.Namespace) -> None:
    n, how = args.matmul_size, "best" if args.stat == "min" else "median"
    print(f"\nTransformer forward throughput (batch 1 = one CFG branch; {how} of {args.fwd_reps} forwards; "
          f"FLOPs from FlopCounterMode, CPU flash attention included):\n")  # fmt: skip
    print(f"fp32 matmul {n}x{n} @ {n}x{n}: {matmul:.1f} GFLOP/s ({how} of {args.matmul_reps}, before/after the "
          f"forwards, better kept); efficiency = forward GFLOP/s / matmul GFLOP/s\n")  # fmt: skip
    print("| model | latent frames | tokens | GFLOP / forward | forward s | GFLOP/s | efficiency vs matmul |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row.model} | {row.frames} | {row.tokens} | {row.flops / 1e9:.1f} | {row.seconds:.3f} "
              f"| {row.gflops_per_s:.1f} | {row.gflops_per_s / matmul:.0%} |")  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ main
def print_environment(args: argparse.Namespace) -> None:
    import diffusers

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, fp32")  # fmt: skip
    print(f"load average before: {', '.join(f'{x:.2f}' if isinstance(x, float) else x for x in load)}")
    print(f"shape {args.height}x{args.width}, {args.steps} steps, guidance {args.guidance_scale}, reasoning "
          f"{args.reasoning_frames} frames for {args.reasoning_steps} steps; {args.warmup} warm-up + "
          f"{args.repeats} timed runs per pipeline and mode")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from chronoedit.demo import draw_example_image

    total_start = time.perf_counter()
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    print_environment(args)
    root = ensure_checkpoint(args)
    ours, ref = load_pipelines(root, args.device)
    params = sum(p.numel() for p in ours.transformer.parameters())
    print(f"transformer: {params / 1e6:.1f} M parameters ({ours.transformer.config.num_layers} layers, "
          f"D {ours.transformer.config.inner_dim}, ffn {ours.transformer.config.ffn_dim})")  # fmt: skip
    image = draw_example_image()
    results = []
    for mode in args.modes:
        print(f"\n[{mode}]", flush=True)
        results.append(bench_mode(mode, ours, ref, args, image))
    flops = None
    if not args.skip_flops:
        print("\n[transformer forwards]", flush=True)
        flops = bench_flops(ours, ref, args)
    print_pipeline_tables(results, args)
    if flops is not None:
        print_flop_table(*flops, args)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"\nload average after: {load}")
    print(f"total benchmark time: {time.perf_counter() - total_start:.1f} s")


if __name__ == "__main__":
    main()
