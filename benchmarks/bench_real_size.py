"""The real 14B ChronoEdit on this machine: a random checkpoint at the real sizes, edited with bf16 storage and fp32
compute, block by block, with the peak memory of every stage.

What it does
------------
1. ``build`` (once, ~47 GB on disk, outside the repo: ``--root``, default ``$CHRONOEDIT_HOME/real-size``) writes a
   checkpoint in the real diffusers layout with random weights at the real sizes: the transformer (40 layers, 40 x
   128 heads, FFN 13824, 36 in-channels, bf16, 2 GB shards + index, the real ``config.json`` naming
   ``WanTransformer3DModel`` without ``rope_temporal_skip_len``), UMT5-XXL's encoder (24 layers, d_model 4096,
   64 heads, FFN 10240, vocabulary 256384, bf16, sharded), CLIP ViT-H/14 (32 layers, 1280 wide, bf16) and the Wan
   VAE with its real default config (fp32). Weights are N(0, 0.02) (norms 1, biases 0) so 40 random blocks stay
   finite. The tokenizer, image processor and scheduler are the demo model's (a 700-word tokenizer: its ids are valid
   rows of the real table), which does not change any cost measured here.
2. ``run`` edits a 64x64 image (2 steps, CFG 5, plain and with temporal reasoning: 29 frames, 8 latent frames) in a
   fresh process per mode, loaded as ``chronoedit edit --offload blocks --dtype fp32`` loads it: the transformer and
   UMT5 memory-mapped in bf16 and streamed one block at a time in fp32 (:mod:`chronoedit.streaming`; CLIP and the
   VAE are loaded whole in fp32, as always). For each stage (load,
   text+image encoding, VAE encode, denoising, VAE decode) it prints the wall time and the peak anonymous memory
   (``RssAnon``, sampled every 20 ms: what the process itself allocated) and the peak RSS (which also counts the
   checkpoint's file pages the kernel has mapped in: they are page cache, dropped under pressure, not allocations).

Goal: it completes with peak anonymous memory under 8 GiB on a 24 GiB, 2-core machine without a GPU.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_real_size.py build`` then ``... run`` (``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

SHARD_BYTES = 2 << 30
STD = 0.02
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, tie_word_embeddings=False, dense_act_fn="gelu_new",
                is_gated_act=True, layer_norm_epsilon=1e-6, model_type="umt5")  # fmt: skip
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu",
                  layer_norm_eps=1e-5)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ build
def random_like(name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """N(0, 0.02) matrices and tables, ones for norm weights, zeros for biases."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 or ("norm" in name and leaf == "weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape, generator=generator, dtype=torch.float32).mul_(STD).to(dtype)


def write_sharded(shapes: dict[str, tuple[int, ...]], folder: Path, prefix: str, index_name: str,
                  dtype: torch.dtype, seed: int) -> None:  # fmt: skip
    """Random tensors of ``shapes`` written as safetensors shards of ~2 GB plus their index, one shard in memory at a
    time."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    weight_map = {}
    for number, keys in enumerate(shards, start=1):
        name = f"{prefix}-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: random_like(k, shapes[k], dtype, generator) for k in keys}, str(folder / name))
        weight_map |= dict.fromkeys(keys, name)
        print(f"  wrote {folder.name}/{name} ({len(keys)} tensors)", flush=True)
    total = sum(torch.Size(s).numel() for s in shapes.values()) * torch.empty(0, dtype=dtype).element_size()
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def meta_shapes(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in skip}


def build(root: Path) -> None:
    """Write the real-size random checkpoint at ``root`` (skipped when it is already complete)."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from chronoedit.demo import ensure_demo_checkpoint
    from chronoedit.model import ChronoEditTransformer3DModel, TransformerConfig

    if (root / "complete.json").is_file():
        print(f"real-size checkpoint already at {root}")
        return
    demo = ensure_demo_checkpoint()
    root.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "image_processor", "scheduler", "model_index.json"):
        target = root / name
        if not target.exists():
            (shutil.copytree if (demo / name).is_dir() else shutil.copy)(demo / name, target)
    t0 = time.perf_counter()
    folder = root / "transformer"
    folder.mkdir(exist_ok=True)
    config = TransformerConfig()
    with torch.device("meta"):
        shapes = meta_shapes(ChronoEditTransformer3DModel(config))
    raw = config.to_dict() | {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.35.0"}
    raw.pop("rope_temporal_skip_len")
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    write_sharded(shapes, folder, "diffusion_pytorch_model", "diffusion_pytorch_model.safetensors.index.json",
                  torch.bfloat16, seed=0)  # fmt: skip
    folder = root / "text_encoder"
    folder.mkdir(exist_ok=True)
    umt5 = UMT5Config(**UMT5_XXL)
    with torch.device("meta"):
        shapes = meta_shapes(UMT5EncoderModel(umt5), skip=("encoder.embed_tokens.weight",))
    umt5.torch_dtype = "bfloat16"
    umt5.save_pretrained(folder)
    write_sharded(shapes, folder, "model", "model.safetensors.index.json", torch.bfloat16, seed=1)
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H)).to(torch.bfloat16)
    clip.save_pretrained(root / "image_encoder")
    del clip
    AutoencoderKLWan().save_pretrained(root / "vae")
    (root / "complete.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    print(f"built {root} in {time.perf_counter() - t0:.0f} s")


# -------------------------------------------------------------------------------------------------------------- run
class MemoryWatch:
    """Peak RssAnon and VmRSS of this process, sampled every 20 ms, per stage."""

    def __init__(self) -> None:
        self.peak_anon = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> tuple[int, int]:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["RssAnon"].split()[0]) << 10, int(fields["VmRSS"].split()[0]) << 10

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            anon, rss = self.now()
            self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)

    def reset(self) -> None:
        self.peak_anon, self.peak_rss = self.now()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def run_one(root: Path, reasoning: bool) -> list[dict[str, Any]]:
    """One edit in this process; a row per stage."""
    from PIL import Image

    from chronoedit.editing import load_pipeline, resolve_model

    watch, rows = MemoryWatch(), []

    @contextmanager
    def stage(name: str):  # type: ignore[no-untyped-def]
        watch.reset()
        t0 = time.perf_counter()
        yield
        rows.append({"stage": name, "s": time.perf_counter() - t0, "anon": watch.peak_anon, "rss": watch.peak_rss})
        print(f"  {name}: {rows[-1]['s']:.1f} s, peak anon {rows[-1]['anon'] / 2**30:.2f} GiB", flush=True)

    def timed(name: str, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            with stage(name):
                return method(*args, **kwargs)

        return call

    with stage("load"):  # what `chronoedit edit --model-path ROOT --offload blocks --dtype fp32 --device cpu` loads
        pipe = load_pipeline(resolve_model(str(root), device="cpu", dtype="fp32", offload_blocks=1))
    pipe.encode_conditioning = timed("text + image encoding", pipe.encode_conditioning)
    pipe.prepare_latents = timed("VAE encode", pipe.prepare_latents)
    pipe.denoise = timed("denoising (2 steps, CFG)", pipe.denoise)
    pipe.decode = timed("VAE decode", pipe.decode)
    image = Image.new("RGB", (64, 64), (180, 90, 40))
    pipe(image=image, prompt="turn the cup blue", height=64, width=64, num_inference_steps=2, guidance_scale=5.0,
         enable_temporal_reasoning=reasoning, num_frames=29 if reasoning else 5, output_type="np",
         generator=torch.Generator().manual_seed(0))  # fmt: skip
    watch.close()
    return rows


def run(root: Path) -> None:
    """Each mode in a fresh process; the table."""
    results = {}
    for mode in ("plain", "reasoning"):
        print(f"{mode}:", flush=True)
        done = subprocess.run([sys.executable, __file__, "one", "--root", str(root), "--mode", mode],
                              stdout=subprocess.PIPE, text=True, check=True)  # fmt: skip
        *progress, last = done.stdout.strip().splitlines()
        print("\n".join(progress), flush=True)
        results[mode] = json.loads(last)
    print("\n| mode | stage | time (s) | peak RssAnon (GiB) | peak RSS (GiB) |\n|---|---|---:|---:|---:|")
    for mode, rows in results.items():
        for row in rows:
            anon, rss = row["anon"] / 2**30, row["rss"] / 2**30
            print(f"| {mode} | {row['stage']} | {row['s']:.1f} | {anon:.2f} | {rss:.2f} |")
        peak = max(row["anon"] for row in rows)
        print(f"| {mode} | **whole edit** | {sum(r['s'] for r in rows):.1f} | **{peak / 2**30:.2f}** | "
              f"{max(r['rss'] for r in rows) / 2**30:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "run", "one"])
    home = Path(os.environ.get("CHRONOEDIT_HOME", Path.home() / ".cache" / "chronoedit"))
    parser.add_argument("--root", type=Path, default=home / "real-size")
    parser.add_argument("--mode", choices=["plain", "reasoning"], default="plain")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.command == "build":
        build(args.root)
    elif args.command == "run":
        run(args.root)
    else:
        rows = run_one(args.root, args.mode == "reasoning")
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
