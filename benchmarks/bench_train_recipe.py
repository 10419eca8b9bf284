"""Loss curves of a tiny LoRA and a tiny full fine-tune, before and after the change to NVIDIA's recipes.

What it runs
------------
One tiny random checkpoint (2 layers, 2 heads x 32, 32x32 pixels) and 4 pairs (a block moves corner to corner).
Four runs of ``--steps`` steps, same seed and data:

- ``lora before``: continuous uniform σ, uniform loss weight (the earlier default);
- ``lora after``: σ one of the 1000 shifted training timesteps, bell-shaped weight (DiffSynth's; the default now);
- ``full before``: continuous uniform σ, uniform weight, no caption dropout (the earlier default);
- ``full after``: logit-normal σ, uniform weight, 20% caption dropout (the base model's recipe; the default now).

How to read it
--------------
``train loss`` is each run's own objective averaged over a window of steps (the weighted loss for ``bell``), so
the before/after numbers of one mode are not the same quantity. ``eval`` is the same for every run: the unweighted
flow-matching loss of the trained model on the 4 pairs at the 9 noise levels σ' = 0.1..0.9 (fixed noise), the
column that says which run fits the data better. Tiny random models on 4 pairs say how the objectives behave, not
how a 14B LoRA will look.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train_recipe.py [--steps 120]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RUNS = {
    "lora before": {"mode": "lora", "timestep_sampling": "uniform", "loss_weighting": "uniform"},
    "lora after": {"mode": "lora"},
    "full before": {"mode": "full", "timestep_sampling": "uniform", "loss_weighting": "uniform", "caption_dropout": 0},
    "full after": {"mode": "full"},
}
LR = {"lora": 1e-2, "full": 1e-3}


def build(workdir: Path) -> tuple[Path, Path]:
    from PIL import Image

    from chronoedit.demo import TinySpec, build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(workdir / "ckpt", TinySpec(num_attention_heads=2, attention_head_dim=32))
    data = workdir / "data"
    data.mkdir()
    lines = ["source,target,prompt"]
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        for corner, role in ((0, "s"), (16, "t")):
            image = Image.new("RGB", (32, 32), (128, 128, 128))
            image.paste(Image.new("RGB", (16, 16), color), (corner, corner))
            image.save(data / f"{role}{i}.png")
        lines.append(f"s{i}.png,t{i}.png,move block {i} to the bottom right")
    (data / "metadata.csv").write_text("\n".join(lines) + "\n")
    return Path(ckpt), data


def evaluate(ckpt: Path, output: Path, mode: str, cache: Path) -> float:
    """The unweighted loss of the trained model on every cached pair at σ' = 0.1..0.9 (noise seeded)."""
    import torch

    from chronoedit import ChronoEditTransformer3DModel
    from chronoedit.lora import load_lora
    from chronoedit.train.cache import load_entry
    from chronoedit.train.flow import flow_matching_loss

    if mode == "lora":
        model = ChronoEditTransformer3DModel.from_pretrained(ckpt, subfolder="transformer")
        load_lora(model, output)
    else:
        model = ChronoEditTransformer3DModel.from_pretrained(output)
    model.eval()
    losses = []
    with torch.no_grad():
        for entry in _entries(cache):
            tensors = load_entry(entry)
            for k, sigma in enumerate([0.1 * i for i in range(1, 10)]):
                noise = torch.randn(tensors["latents"].shape, generator=torch.Generator().manual_seed(k))
                batch = {key: value[None] for key, value in tensors.items()}
                batch.update(noise=noise[None], sigma=torch.tensor([sigma]))
                losses.append(float(flow_matching_loss(model, batch)))
    return statistics.mean(losses)


def _entries(cache: Path) -> list:
    """The run's cache entries, as the training built them (read back from its train_config.json)."""
    import json

    from chronoedit.train.cache import CacheSettings, cache_entries, encoder_identities
    from chronoedit.train.data import read_dataset

    config = json.loads((cache.parent / "train_config.json").read_text())
    settings = CacheSettings(config["model_path"], config["height"], config["width"], config["max_area"], "float32")
    specs = read_dataset(config["dataset"])
    return cache_entries(specs, cache, settings, encoder_identities(config["model_path"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--window", type=int, default=20)
    args = parser.parse_args()
    import torch

    from chronoedit.train import TrainConfig, train

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, data = build(Path(tmp))
        rows = []
        for name, settings in RUNS.items():
            out = Path(tmp) / name.replace(" ", "-")
            config = TrainConfig(model_path=str(ckpt), dataset=str(data), output_dir=str(out), height=32, width=32,
                                 mixed_precision="no", gradient_checkpointing=False, quiet=True, lora_rank=8,
                                 learning_rate=LR[settings["mode"]], max_steps=args.steps, checkpoint_every=0,
                                 **settings)  # fmt: skip
            result = train(config, log=lambda _: None)
            windows = [statistics.mean(result.losses[i : i + args.window])
                       for i in range(0, len(result.losses), args.window)]  # fmt: skip
            rows.append((name, config, windows, evaluate(ckpt, result.output, settings["mode"], out / "cache")))
    print(f"{'run':<12} {'sampling':<14} {'weight':<8} {'drop':>4}  train loss per {args.window} steps{'':<24} eval")
    for name, config, windows, final in rows:
        curve = " ".join(f"{w:.3f}" for w in windows)
        print(f"{name:<12} {config.sampling:<14} {config.weighting:<8} {config.dropout:>4.1f}  {curve:<44} {final:.4f}")
    for mode in ("lora", "full"):
        before, after = (r[3] for r in rows if r[0].startswith(mode))
        print(f"{mode}: eval loss after / before = {after / before:.3f}")


if __name__ == "__main__":
    main()
