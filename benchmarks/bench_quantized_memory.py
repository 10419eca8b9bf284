"""Memory and speed of a transformer loaded from bf16, fp8-scaled and GGUF (Q8_0, Q4_0) files, weights kept quantized.

What it measures
----------------
1. A mid-size random ChronoEdit transformer (by default 8 layers, 12 heads x 128 = D 1536, FFN 8960, the 14B's
   text/CLIP widths 4096/1280; ~0.45B parameters) is written once, with the original Wan / ComfyUI names, as: a bf16
   safetensors file, an fp8-scaled safetensors file (e4m3 Linear weights + ``scale_weight``, the rest bf16) and
   city96-style GGUF files (Linear weights Q8_0 / Q4_0, 1-D tensors and tables F32, the patch embedding F16).
2. Each file is loaded in a fresh Python process (``load_transformer(path, torch_dtype=bf16)``, default
   ``quantized="keep"``). Memory is the kernel's RSS high-water mark of the process (``VmHWM``, reset through
   ``/proc/self/clear_refs`` right before loading and again before the forwards, so it is exact and not inherited
   from the parent), reported minus the RSS just before loading (torch and friends imported): the peak while
   loading, the RSS after loading, the RSS after the forwards (safetensors tensors are memory-mapped: their pages
   become resident only when first used, so "after load" undercounts the bf16 and fp8 files; "after forward" is the
   model in use) and the peak during the forwards (weights + activations + per-layer dequantized weights).
   Also: the bytes of the model's parameters and buffers, the load time. The fp8 and Q8_0 files are also loaded
   with ``quantized="dequantize"`` (rows "... dequantized at load": the behaviour before weights were kept
   quantized) for comparison.
3. Forward time (batch 1, 2 latent frames of 16x16, 512 text tokens, 257 CLIP tokens; best of ``--repeats`` after
   a warm-up): for quantized files every Linear dequantizes its weight to bf16 at each call, so this is where
   keeping weights quantized costs time. On a CPU without native bf16 the bf16 matmuls dominate.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_quantized_memory.py`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

FORMATS = ("bf16", "fp8", "Q8_0", "Q4_0")
FILE_NAMES = {
    "bf16": "model_bf16.safetensors",
    "fp8": "model_fp8_scaled.safetensors",
    "Q8_0": "model-Q8_0.gguf",
    "Q4_0": "model-Q4_0.gguf",
}
FP8_MAX = 448.0  # largest float8_e4m3fn value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/chronoedit-bench-quant"), help="where files go")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12, help="x 128 channels each (D = heads * 128)")
    parser.add_argument("--ffn", type=int, default=8960)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards (best is reported)")
    parser.add_argument("--rebuild", action="store_true", help="write the files again even if present")
    parser.add_argument(
        "--dense", nargs="*", default=["fp8", "Q8_0"], choices=FORMATS, help="also load these dequantized at load"
    )
    parser.add_argument("--quantized", default="keep", help=argparse.SUPPRESS)  # child process: loading mode
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child process: measure one file
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------- writing files
def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from chronoedit import ChronoEditTransformer3DModel, TransformerConfig

    torch.manual_seed(0)
    dim = args.heads * 128
    config = TransformerConfig(
        num_layers=args.layers, num_attention_heads=args.heads, ffn_dim=args.ffn, added_kv_proj_dim=dim
    )
    return ChronoEditTransformer3DModel(config).eval().requires_grad_(False)


def original_state(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """Original Wan name -> (fp32 tensor, is a Linear weight)."""
    from chronoedit.keymap import ours_to_original

    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return {ours_to_original(k): (v, k in linears) for k, v in model.state_dict().items()}


def write_safetensors(state: dict[str, tuple[torch.Tensor, bool]], path: Path, fp8: bool) -> None:
    """bf16 file; with ``fp8`` the Linear weights are e4m3 with a per-tensor ``scale_weight`` (ComfyUI fp8_scaled)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)} if fp8 else {}
    for name, (value, is_linear) in state.items():
        if fp8 and is_linear:
            scale = value.abs().max().float() / FP8_MAX
            tensors[name] = (value / scale).to(torch.float8_e4m3fn)
            tensors[name.rsplit(".", 1)[0] + ".scale_weight"] = scale.reshape(1)
        else:
            tensors[name] = value.to(torch.bfloat16).contiguous()
    save_file(tensors, str(path))


def write_gguf(state: dict[str, tuple[torch.Tensor, bool]], path: Path, qtype_name: str) -> None:
    """city96-style GGUF: Linear weights in ``qtype_name``, 1-D / tables F32, >4-D tensors flattened F16 with
    ``comfy.gguf.orig_shape``."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    writer = gguf.GGUFWriter(str(path), arch="wan")
    for name, (value, is_linear) in state.items():
        array = value.float().numpy()
        if is_linear and array.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        elif array.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(array.shape))
            writer.add_tensor(name, array.reshape(array.shape[0], -1).astype(np.float16))
        elif is_linear:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_files(args: argparse.Namespace) -> dict[str, Path]:
    args.dir.mkdir(parents=True, exist_ok=True)
    paths = {fmt: args.dir / FILE_NAMES[fmt] for fmt in args.formats}
    todo = [fmt for fmt, path in paths.items() if args.rebuild or not path.is_file()]
    if todo:
        model = build_model(args)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {args.layers} layers, D {model.config.inner_dim}, FFN {args.ffn}: {n_params / 1e9:.3f}B params")
        state = original_state(model)
        for fmt in todo:
            start = time.perf_counter()
            if fmt in ("bf16", "fp8"):
                write_safetensors(state, paths[fmt], fp8=fmt == "fp8")
            else:
                write_gguf(state, paths[fmt], fmt)
            print(f"wrote {paths[fmt]} in {time.perf_counter() - start:.1f}s")
        del model, state
    return paths


# ------------------------------------------------------------------------------------- measuring (child process)
def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> None:
    """Set the kernel's RSS high-water mark (VmHWM) of this process back to its current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """VmHWM: the largest RSS since the process started or since :func:`reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def inputs(config: Any) -> tuple[torch.Tensor, ...]:
    """Batch 1: latents [1, 36, 2, 16, 16], timestep, text [1, 512, text_dim], CLIP [1, 257, image_dim] (bf16)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.in_channels, 2, 16, 16, generator=gen)
    text = torch.randn(1, 512, config.text_dim, generator=gen)
    clip = torch.randn(1, 257, config.image_dim, generator=gen)
    return x.bfloat16(), torch.tensor([500]), text.bfloat16(), clip.bfloat16()


def measure(path: Path, repeats: int, quantized: str) -> dict[str, Any]:
    """Load ``path`` in bf16 and run forwards; everything in bytes / seconds."""
    from chronoedit.loading import load_transformer
    from chronoedit.memory import module_bytes
    from chronoedit.quant import quantized_linears

    args = inputs_for(path)
    gc.collect()
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    model = load_transformer(path, torch_dtype=torch.bfloat16, quantized=quantized)
    load_s = time.perf_counter() - start
    gc.collect()
    load_peak, after_load = peak_rss_bytes(), rss_bytes()
    reset_peak_rss()
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(*args)
            times.append(time.perf_counter() - start)
    gc.collect()
    return {
        "file_bytes": path.stat().st_size,
        "model_bytes": module_bytes(model),
        "quantized_linears": len(quantized_linears(model)),
        "rss_before": before,
        "load_peak": load_peak - before,
        "after_load": after_load - before,
        "after_forward": rss_bytes() - before,
        "forward_peak": peak_rss_bytes() - before,
        "load_s": load_s,
        "forward_s": min(times[1:]),
    }


def inputs_for(path: Path) -> tuple[torch.Tensor, ...]:
    """The forward's inputs, made before loading (their memory is in the baseline)."""
    from chronoedit.loading import transformer_source

    return inputs(transformer_source(path).config)


def run_child(path: Path, repeats: int, quantized: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--measure", str(path), "--repeats", str(repeats), "--quantized", quantized]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------ reporting
def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table; memory in GiB above the RSS before loading."""
    gib = 1024**3
    head = (
        "| format | file | weights in memory | quantized Linears | peak RSS during load | RSS after load "
        "| RSS after forward | peak RSS during forward | load s | forward s |"
    )
    lines = [head, "|---|" + "---:|" * 9]
    for fmt, r in results.items():
        sizes = [r[k] / gib for k in ("file_bytes", "model_bytes")]
        memory = [r[k] / gib for k in ("load_peak", "after_load", "after_forward", "forward_peak")]
        cells = [fmt, *(f"{v:.2f}" for v in sizes), str(r["quantized_linears"]), *(f"{v:.2f}" for v in memory)]
        cells += [f"{r['load_s']:.1f}", f"{r['forward_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    base = max(r["rss_before"] for r in results.values()) / gib
    return "\n".join(lines) + f"\n\nGiB; RSS columns are above the RSS before loading (imports: ~{base:.2f} GiB)."


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.repeats, args.quantized)))
        return 0
    paths = write_files(args)
    results = {}
    for fmt, path in paths.items():
        results[fmt] = run_child(path, args.repeats, "keep")
        print(f"{fmt}: {results[fmt]}", flush=True)
        if fmt in args.dense and fmt != "bf16":
            results[f"{fmt} dequantized at load"] = run_child(path, args.repeats, "dequantize")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, CPU, compute dtype bf16\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
