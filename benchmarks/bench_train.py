"""Seconds per training step of ``chronoedit train`` on the CPU (fp32), for a tiny and a mid-size random model.

What it measures
----------------
For each size (``tiny``: 2 layers, D 32, 32x32 pixels; ``mid``: 4 layers, 4 heads x 128 = D 512, FFN 2048,
128x128 pixels = 2 latent frames of 16x16, 128 video tokens + 769 context tokens), a random checkpoint in the real
folder layout is built once under ``--workdir`` with a 4-pair dataset, and its encoder outputs cached once. Then for
LoRA (rank 32, NVIDIA's targets) and full fine-tuning, with and without gradient checkpointing, ``--steps``
optimizer steps run through :func:`chronoedit.train.train` (batch 1, no accumulation, no checkpoints); the time of
each step (forward, backward, clipping, AdamW) is read from ``train_log.jsonl``. The first step is dropped (warm-up).

How to read it
--------------
``median s/step`` is the steadiest figure on a shared machine; ``min`` the best case. ``trainable`` counts the
parameters the optimizer updates. Gradient checkpointing trades time (one more forward per block) for activation
memory: on these small shapes the memory is irrelevant, the time cost is what shows.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train.py`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = {
    "tiny": ({"num_attention_heads": 2, "attention_head_dim": 16}, 32),
    "mid": ({"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 128, "ffn_dim": 2048}, 128),
}


def build_size(workdir: Path, name: str) -> tuple[Path, Path, int]:
    """(checkpoint, dataset, pixels) of one size, built once."""
    from PIL import Image

    from chronoedit.demo import TinySpec, build_tiny_checkpoint

    spec_kwargs, pixels = SIZES[name]
    ckpt = workdir / f"ckpt-{name}"
    if not (ckpt / "model_index.json").is_file():
        build_tiny_checkpoint(ckpt, TinySpec(**spec_kwargs))
    data = workdir / f"data-{pixels}"
    if not (data / "metadata.csv").is_file():
        data.mkdir(parents=True, exist_ok=True)
        lines = ["source,target,prompt"]
        for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
            for corner, role in ((0, "s"), (pixels // 2, "t")):
                image = Image.new("RGB", (pixels, pixels), (128, 128, 128))
                image.paste(Image.new("RGB", (pixels // 2, pixels // 2), color), (corner, corner))
                image.save(data / f"{role}{i}.png")
            lines.append(f"s{i}.png,t{i}.png,move block {i}")
        (data / "metadata.csv").write_text("\n".join(lines) + "\n")
    return ckpt, data, pixels


def measure(workdir: Path, name: str, mode: str, checkpointing: bool, steps: int) -> dict[str, float]:
    """Train ``steps`` steps; per-step seconds from the log (first step dropped)."""
    from chronoedit.train import TrainConfig, train

    ckpt, data, pixels = build_size(workdir, name)
    out = workdir / f"run-{name}-{mode}-{int(checkpointing)}"
    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig(
        model_path=str(ckpt), dataset=str(data), output_dir=str(out), cache_dir=str(workdir / f"cache-{name}"),
        mode=mode, height=pixels, width=pixels, mixed_precision="no", gradient_checkpointing=checkpointing,
        max_steps=steps + 1, checkpoint_every=0, quiet=True, learning_rate=1e-4,
    )  # fmt: skip
    result = train(config, log=lambda _: None)
    seconds = [json.loads(line)["seconds"] for line in (out / "train_log.jsonl").read_text().splitlines()][1:]
    trainable = _trainable(ckpt, mode)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"median": statistics.median(seconds), "min": min(seconds), "trainable": trainable, "steps": result.step}


def _trainable(ckpt: Path, mode: str) -> int:
    from chronoedit import ChronoEditTransformer3DModel
    from chronoedit.train.config import DEFAULT_LORA_TARGETS
    from chronoedit.train.lora import add_lora, count, trainable_parameters

    model = ChronoEditTransformer3DModel.from_pretrained(str(ckpt), subfolder="transformer")
    if mode == "full":
        return sum(p.numel() for p in model.parameters())
    add_lora(model, list(DEFAULT_LORA_TARGETS), 32, 32.0)
    return count(trainable_parameters(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "chronoedit-bench-train")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (default 10)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, fp32, batch 1")
    header = f"{'size':<6}{'mode':<6}{'grad ckpt':<11}{'trainable':>12}{'median s/step':>15}{'min s/step':>12}"
    print(header)
    print("-" * len(header))
    for name in args.sizes:
        for mode in ("lora", "full"):
            for checkpointing in (False, True):
                r = measure(args.workdir, name, mode, checkpointing, args.steps)
                print(f"{name:<6}{mode:<6}{'on' if checkpointing else 'off':<11}{r['trainable']:>12,}"
                      f"{r['median']:>15.4f}{r['min']:>12.4f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
