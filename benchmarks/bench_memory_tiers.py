"""Peak GPU memory of one 720p edit of the real 14B per memory tier: weights measured here at the real width with
reduced depth, scaled to 40 layers, plus the activations of one real-width block measured here.

How
---
1. **Weights per layer, measured.** Random transformers at the 14B's width (40 x 128 heads, FFN 13824, text 4096,
   CLIP 1280) with 1 and 2 layers are written as the files users run: bf16 safetensors, fp8-scaled safetensors
   (ComfyUI layout) and GGUF Q8_0 / Q4_K (Q4_K blocks hold random bytes: gguf-py cannot quantize to it, and the
   memory does not depend on the values). Each is loaded in a fresh process as ``chronoedit`` loads it (bf16
   compute, quantized weights kept quantized) and run once (``bench_quantized_memory.measure``); the RSS it adds
   after the forward is the model in use. 40 layers = the 1-layer figure + 39 x (2-layer - 1-layer).
2. **Activations, measured.** One real-width block on 7200 video tokens (2 latent frames of 90 x 160, patch 2: a 720p
   plain edit), both CFG branches in one batch, fp32 on this CPU: the peak anonymous memory while it runs minus its
   weights and inputs. GPU figures take half (bf16 activations; the float32 modulation temporaries make this a
   slight underestimate) plus the residual stream and context of the whole model.
3. **Tiers** (what is on the GPU at the peak, the rest of the pipeline's components from their exact parameter
   counts: UMT5-XXL 5.7 B, CLIP ViT-H 0.63 B, the Wan VAE 0.13 B in fp32 as chronoedit runs it):
   all resident; model offload (= diffusers' ``enable_model_cpu_offload``; also our ``--low-memory`` on a GPU,
   which additionally frees host memory); diffusers' ``enable_sequential_cpu_offload`` (one leaf module at a time);
   block streaming with k = 1 and 4 (k blocks cast, k more prefetched on a side stream); the transformer kept fp8 or
   GGUF Q8_0 / Q4_K (one layer dequantized at a time); next to NVIDIA's reported 34 GB (38 with reasoning).
   Not a GPU measurement: there is no GPU here. The CUDA allocator's fragmentation and cuBLAS workspaces
   (~0.5-1 GB) come on top.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_memory_tiers.py`` (~10 min; files in ``--dir``).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from bench_quantized_memory import original_state, run_child, write_gguf, write_safetensors

GiB = 2**30
FORMATS = ("bf16", "fp8", "Q8_0", "Q4_K")
TOKENS = 2 * 45 * 80  # a 720p plain edit: 2 latent frames of 90 x 160, patch 2 x 2
UMT5_XXL_PARAMS = 5.68e9  # encoder only (24 layers, d_model 4096, vocab 256384), as in bench_real_size
CLIP_H_PARAMS = 0.632e9  # ViT-H/14 vision tower
VAE_PARAMS = 0.127e9  # Wan VAE, default config
NVIDIA = {"plain": 34.0, "reasoning": 38.0}  # GB, NVIDIA's script with --offload_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/chronoedit-bench-tiers"))
    parser.add_argument("--skip-activations", action="store_true")
    return parser.parse_args()


def real_width(layers: int) -> torch.nn.Module:
    from chronoedit.model import ChronoEditTransformer3DModel, TransformerConfig

    torch.manual_seed(0)
    model = ChronoEditTransformer3DModel(TransformerConfig(num_layers=layers))
    for param in model.parameters():  # small values: fp8 and GGUF scales stay sane
        param.data.mul_(0.02 / max(param.data.std().item(), 1e-6) if param.ndim > 1 else 1.0)
    return model.eval().requires_grad_(False)


def write_q4_k(state: dict[str, tuple[torch.Tensor, bool]], path: Path) -> None:
    """A GGUF file whose Linear weights are Q4_K blocks of random bytes (144 bytes per 256 weights)."""
    import gguf

    qtype = gguf.GGMLQuantizationType.Q4_K
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch="wan")
    for name, (value, is_linear) in state.items():
        array = value.float().numpy()
        if is_linear and array.shape[-1] % 256 == 0:
            raw = rng.integers(0, 256, size=(array.shape[0], array.shape[1] // 256 * 144), dtype=np.uint8)
            raw[:, :4] = np.frombuffer(np.array([0.01, 0.0], dtype=np.float16).tobytes(), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qtype)
        elif array.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(array.shape))
            writer.add_tensor(name, array.reshape(array.shape[0], -1).astype(np.float16))
        else:
            writer.add_tensor(name, array.astype(np.float16 if is_linear else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def files_for(layers: int, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"bf16": folder / f"L{layers}_bf16.safetensors", "fp8": folder / f"L{layers}_fp8.safetensors",
             "Q8_0": folder / f"L{layers}-Q8_0.gguf", "Q4_K": folder / f"L{layers}-Q4_K.gguf"}  # fmt: skip
    if all(p.is_file() for p in paths.values()):
        return paths
    state = original_state(real_width(layers))
    for fmt, path in paths.items():
        start = time.perf_counter()
        if fmt in ("bf16", "fp8"):
            write_safetensors(state, path, fp8=fmt == "fp8")
        elif fmt == "Q8_0":
            write_gguf(state, path, "Q8_0")
        else:
            write_q4_k(state, path)
        print(f"  wrote {path.name} ({path.stat().st_size / GiB:.2f} GiB) in {time.perf_counter() - start:.0f} s",
              flush=True)  # fmt: skip
    return paths


def scaled_weights(folder: Path) -> dict[str, dict[str, float]]:
    """Per format: the model in use after one forward (GiB) at 1 and 2 layers, per layer, and scaled to 40."""
    measured: dict[int, dict[str, Any]] = {}
    for layers in (1, 2):
        print(f"[{layers} layer(s) at real width]", flush=True)
        measured[layers] = {fmt: run_child(path, 1, "keep") for fmt, path in files_for(layers, folder).items()}
    out = {}
    for fmt in FORMATS:
        one, two = (measured[n][fmt]["after_forward"] / GiB for n in (1, 2))
        out[fmt] = {"L1": one, "L2": two, "per_layer": two - one, "L40": one + 39 * (two - one),
                    "file_L1": measured[1][fmt]["file_bytes"] / GiB}  # fmt: skip
    return out


def anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


def block_activations() -> float:
    """Peak anonymous memory (GiB) of one real-width fp32 block on TOKENS tokens, batch 2, above weights + inputs."""
    from chronoedit.model import TransformerConfig
    from chronoedit.model.transformer import TransformerBlock

    cfg = TransformerConfig(num_layers=1)
    block = TransformerBlock(cfg).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, TOKENS, cfg.inner_dim, generator=gen)
    context = torch.randn(2, 257 + 512, cfg.inner_dim, generator=gen)
    t_mod = torch.randn(2, 6, cfg.inner_dim, generator=gen)
    angles = torch.randn(1, TOKENS, 1, cfg.attention_head_dim // 2, generator=gen)
    rope = (angles.cos(), angles.sin())
    base, peak, stop = anon_bytes(), [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], anon_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with torch.no_grad():
        out = block(x, context, t_mod, rope)
    stop.set()
    thread.join()
    del out
    return (max(peak[0], base) - base) / GiB


def tiers(weights: dict[str, dict[str, float]], activations_fp32: float, frames: int = 2) -> list[tuple[str, float]]:
    """(tier, GPU GiB at the peak) for a 720p edit with ``frames`` latent frames, bf16 compute. Activations grow
    linearly with the tokens (attention is flash / memory-efficient on GPUs): ``frames / 2`` times the plain edit's."""
    bf16 = weights["bf16"]
    layer, transformer = bf16["per_layer"], bf16["L40"]
    rest = transformer - 40 * layer  # embeddings and output head
    act = (activations_fp32 / 2 + 2 * TOKENS * 5120 * 4 / GiB) * frames / 2  # a bf16 block + the fp32 residual
    umt5, clip, vae = UMT5_XXL_PARAMS * 2 / GiB, CLIP_H_PARAMS * 4 / GiB, VAE_PARAMS * 4 / GiB
    largest_linear = 5120 * 13824 * 2 / GiB
    rows = [
        ("all resident (bf16): transformer + VAE + activations", max(transformer + vae + act, umt5 + clip)),
        ("model offload (= diffusers' enable_model_cpu_offload; also --low-memory): largest component + activations",
         max(transformer, umt5) + act),
        ("diffusers' enable_sequential_cpu_offload: one Linear + activations", largest_linear + act),
        ("--offload blocks (k=1): embeddings + 1 block cast + 1 prefetched + activations", rest + 2 * layer + act),
        ("--offload blocks:4: embeddings + 4 cast + 4 prefetched + activations", rest + 8 * layer + act),
    ]  # fmt: skip
    for fmt in ("fp8", "Q8_0", "Q4_K"):
        rows.append((f"{fmt} transformer resident: weights + one layer dequantized + activations",
                     max(weights[fmt]["L40"] + layer + act, umt5 + clip)))  # fmt: skip
    return rows


def main() -> None:
    args = parse_args()
    weights = scaled_weights(args.dir)
    print("\n## Transformer weights in use after one forward (bf16 compute), measured at 1 and 2 layers\n")
    print("| format | file, 1 layer (GiB) | 1 layer (GiB) | 2 layers (GiB) | per layer (GiB) | scaled to 40 (GiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for fmt, row in weights.items():
        print(f"| {fmt} | {row['file_L1']:.2f} | {row['L1']:.2f} | {row['L2']:.2f} | {row['per_layer']:.3f} | "
              f"{row['L40']:.1f} |")  # fmt: skip
    activations = 0.0 if args.skip_activations else block_activations()
    print(f"\nOne real-width block, {TOKENS} tokens, CFG batch 2, fp32: {activations:.2f} GiB of activations at its "
          "peak (measured)")  # fmt: skip
    print("\n## Peak GPU memory of one 720p edit (bf16), per tier\n")
    print("| tier | plain edit (GiB) | with temporal reasoning, 8 latent frames (GiB) |")
    print("|---|---:|---:|")
    for (name, plain), (_, reasoning) in zip(tiers(weights, activations), tiers(weights, activations, 8),
                                             strict=True):  # fmt: skip
        print(f"| {name} | {plain:.1f} | {reasoning:.1f} |")
    print(f"| NVIDIA's script, --offload_model (reported: {NVIDIA['plain']:.0f} / {NVIDIA['reasoning']:.0f} GB) | "
          f"{NVIDIA['plain'] * 1e9 / GiB:.1f} | {NVIDIA['reasoning'] * 1e9 / GiB:.1f} |")


if __name__ == "__main__":
    main()
