"""``chronoedit convert``: any transformer checkpoint we can read -> a diffusers-layout transformer folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError

SIZE_UNITS = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="write a transformer checkpoint as a diffusers-layout folder",
        description="Read a transformer (diffusers folder, or one .safetensors file with diffusers or original "
        "Wan/ComfyUI names, fp8-scaled included) and write it as a diffusers-layout folder: config.json naming "
        "ChronoEditTransformer3DModel (temporal skip explicit), sharded safetensors and their index.",
    )
    parser.add_argument("source", help="transformer folder, checkpoint folder (uses transformer/) or .safetensors file")
    parser.add_argument("output", type=Path, help="folder to create (must not exist)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weights dtype (bf16)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (5GB)")
    parser.add_argument("--config", type=Path, help="config.json to use for a single file instead of inferring it")
    parser.set_defaults(handler=handle)
    return parser


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' -> bytes."""
    value = text.strip().upper()
    for unit, factor in SIZE_UNITS.items():
        if value.endswith(unit):
            value, scale = value[: -len(unit)], factor
            break
    else:
        scale = 1
    try:
        size = int(float(value) * scale)
    except (ValueError, OverflowError) as err:  # OverflowError: inf
        raise UserError(f"--max-shard-size: cannot read {text!r} (use e.g. 5GB or 500MB)", "max_shard_size") from err
    if size <= 0:
        raise UserError(f"--max-shard-size must be positive, got {text!r}", "max_shard_size")
    return size


def handle(args: argparse.Namespace) -> int:
    from ..devices import torch_dtype
    from ..loading import load_transformer, read_json
    from ..model import TransformerConfig
    from ..saving import save_transformer

    if args.output.exists():
        raise UserError(f"output folder already exists: {args.output}")
    max_bytes = parse_size(args.max_shard_size)
    source = Path(args.source)
    subfolder = "transformer" if (source / "model_index.json").is_file() else None
    config = None
    if args.config:
        config = TransformerConfig.from_dict(read_json(Path(args.config)), where=f"--config {args.config}")
    model = load_transformer(
        source, subfolder=subfolder, torch_dtype=torch_dtype(args.dtype), config=config, quantized="dequantize"
    )
    folder = save_transformer(model, args.output, max_shard_bytes=max_bytes)
    files = sorted(p.name for p in folder.iterdir())
    print(f"wrote transformer folder: {folder} ({len(files)} files, {model.config.num_layers} layers, {args.dtype})")
    return 0
