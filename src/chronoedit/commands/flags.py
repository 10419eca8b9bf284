"""Flags shared by ``edit``, ``batch`` and ``serve`` (NVIDIA's names), turned into the application layer's settings,
and the command line's words for the settings' fields (``seed`` -> ``--seed``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..devices import DTYPE_NAMES
from ..editing import (
    DEFAULT_STEPS,
    DEMO,
    DEMO_STEPS,
    MODEL_PATH_ENV,
    EditSettings,
    ModelSpec,
    parse_lora,
    parse_offload,
    resolve_model,
)
from ..presets import PRESETS
from ..rules import PLAIN_EDIT_FRAMES, REASONING_FRAMES
from ..speed.attention import ATTENTION_NAMES
from ..speed.caches import CACHE_NAMES

# Fields whose flag is not simply --field-name.
_FLAG_WORDS = {
    "offload_model": "--offload_model",
    "lora_path": "--lora-path",
    "image": "--input",
    "prompt_text": "the enhanced prompt's file",
}


def flag_word(field: str) -> str:
    """The command line's name for a settings field."""
    return _FLAG_WORDS.get(field, "--" + field.replace("_", "-"))


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Steps, guidance, flow shift, output size and seed; the speed options of an edit."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--num-inference-steps", type=int, metavar="N", default=None,
                       help=f"denoising steps (default {DEFAULT_STEPS}; {DEMO_STEPS} with the demo model)")
    group.add_argument("--guidance-scale", type=float, metavar="G", help="guidance scale (default 5.0)")
    group.add_argument("--flow-shift", type=float, metavar="S", help="scheduler flow shift (default 5.0)")
    group.add_argument("--height", type=int, metavar="H", help="output height, a multiple of 16 (with --width)")
    group.add_argument("--width", type=int, metavar="W", help="output width, a multiple of 16 (with --height)")
    group.add_argument("--max-area", type=int, metavar="PIXELS", default=None,
                       help="pixel area for automatic sizing that keeps the aspect ratio "
                       "(default 720*1280; 256*256 with the demo model)")
    group.add_argument("--seed", type=int, metavar="N", default=None, help="random seed (default 0)")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--cache", metavar="NAME[:VALUE]", default=None,
                       help=f"step cache ({', '.join(CACHE_NAMES)}): first-block[:THRESHOLD] (default 0.05) skips "
                       "the other blocks while the first block's output barely changes; taylorseer[:INTERVAL] "
                       "(default 5) runs the model every INTERVAL steps and extrapolates between. Faster, not "
                       "identical; each CFG branch keeps its own cache")
    speed.add_argument("--no-cfg-batch", dest="cfg_batch", action="store_false", default=None,
                       help="run the two CFG branches as two forwards instead of one batch of two (same result, "
                       "less activation memory)")


def add_reasoning_args(parser: argparse.ArgumentParser, title: str = "temporal reasoning",
                       what: str = "the edit") -> argparse._ArgumentGroup:  # fmt: skip
    """Temporal reasoning, its steps and the frame count (``what``: whom the switch applies to, for the help)."""
    group = parser.add_argument_group(title)
    group.add_argument("--enable-temporal-reasoning", action="store_true",
                       help=f"imagine {what} as a video first ({REASONING_FRAMES} frames) for more physically "
                       "plausible edits")  # fmt: skip
    group.add_argument("--num-temporal-reasoning-steps", type=int, metavar="N", default=None,
                       help="steps that keep the reasoning frames (default: all steps)")
    group.add_argument("--num-frames", type=int, metavar="N", default=None,
                       help=f"frames, 4k+1 (default {REASONING_FRAMES} with reasoning, {PLAIN_EDIT_FRAMES} without)")
    return group


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Checkpoint, device, dtype, offloading and verbosity."""
    group = parser.add_argument_group("model and device")
    group.add_argument("--model-path", metavar="PATH", default=None,
                       help=f"ChronoEdit diffusers checkpoint folder (default: ${MODEL_PATH_ENV}, else '{DEMO}', "
                       "a tiny random-weight model whose output is noise)")
    group.add_argument(
        "--transformer", type=Path, metavar="PATH",
        help="use this transformer instead of the model folder's: a single .safetensors file (diffusers or original "
        "Wan/ComfyUI names; fp8 kept quantized), a .gguf file (Q8_0, Q4_K, ...; kept quantized, each layer "
        "dequantized as it runs) or a transformer folder; the other components come from --model-path",
    )
    group.add_argument("--device", metavar="DEVICE", help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                       help="model dtype (default: bf16 on GPU, fp32 on CPU and for the demo model)")
    group.add_argument("--offload_model", "--offload-model", dest="offload_model", action="store_true",
                       help="keep components on the CPU and move each to the GPU only while it runs")
    group.add_argument("--offload", metavar="MODE", default=None,
                       help="model (as --offload_model) or blocks[:K]: the transformer's and UMT5's weights stay as "
                       "stored (bf16, memory-mapped) and K blocks at a time (default 1) are cast to --dtype on the "
                       "device while they run: the real 14B in a few GB")
    group.add_argument("--attention", metavar="BACKEND", default=None,
                       help=f"attention backend ({', '.join(ATTENTION_NAMES)}; default sdpa): flash, sage and "
                       "xformers need their package and a CUDA GPU, through diffusers' attention dispatcher")
    group.add_argument("--compile", action="store_true", default=False,
                       help="torch.compile the transformer block (one compiled graph shared by all blocks): the "
                       "first step pays the compile time (~30 s on the CPU even for the demo model), later steps run "
                       "faster on GPU; same result within 1e-5")
    group.add_argument("--low-memory", action="store_true", default=None,
                       help="load UMT5, CLIP and the VAE only while their stage runs and free them after (the peak is "
                       "the largest stage, not the sum); on by itself when the components would not fit in memory")
    group.add_argument("--quiet", action="store_true", help="no progress bar or stage messages")


def add_parallel_args(parser: argparse.ArgumentParser, switch: str | None = None) -> None:
    """Context parallel over the processes of a ``torchrun`` launch. ``switch``: the help of a ``--context-parallel``
    flag that turns it on (batch); without one it is on whenever there are several processes (edit)."""
    group = parser.add_argument_group(
        "several GPUs (torchrun --nproc_per_node=N -m chronoedit ...)",
        "one edit over all N processes: the token sequence split over them (Ulysses all-to-all over the attention "
        "heads, ring attention where the heads do not divide), optionally the two guidance branches on two halves; "
        "unset degrees are chosen and the layout is printed",
    )
    if switch is not None:
        group.add_argument("--context-parallel", action="store_true", default=False, help=switch)
    else:
        parser.set_defaults(context_parallel=None)
    group.add_argument("--ulysses-degree", type=int, metavar="N", default=None,
                       help="processes that split the attention heads (must divide the heads: 40 for the 14B)")
    group.add_argument("--ring-degree", type=int, metavar="N", default=None,
                       help="processes that pass keys and values around a ring")
    group.add_argument("--cfg-parallel", action="store_true", default=False,
                       help="run the conditional and unconditional guidance branches on two halves of the processes")


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    """LoRAs, each with its own scale, and the presets of NVIDIA's companion LoRAs."""
    group = parser.add_argument_group("LoRAs and presets")
    group.add_argument(
        "--lora-path", nargs="+", metavar="FILE[:SCALE]", default=[],
        help="LoRA safetensors files (any layout: diffusers, Wan/ComfyUI, DiffSynth, musubi), each optionally with "
        "its own scale, e.g. a.safetensors:0.8 b.safetensors",
    )
    group.add_argument("--lora-scale", type=float, default=1.0, help="scale of LoRAs given without one (1.0)")
    group.add_argument("--lora-allow-unmatched", action="store_true",
                       help="warn about LoRA keys that match no layer instead of failing")
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help="; ".join(p.describe() for p in PRESETS.values()) + ". Explicit flags override the "
                       "preset's values.")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The model the flags name, checked (see :func:`chronoedit.editing.resolve_model`)."""
    offload_model, offload_blocks = parse_offload(args.offload) if args.offload else (False, 0)
    return resolve_model(
        model_path=args.model_path, transformer=args.transformer, device=args.device, dtype=args.dtype,
        offload_model=args.offload_model or offload_model, offload_blocks=offload_blocks,
        loras=[parse_lora(text, args.lora_scale) for text in args.lora_path],
        lora_strict=not args.lora_allow_unmatched, lora_scale=args.lora_scale,
        attention=getattr(args, "attention", None), compile=bool(getattr(args, "compile", False)),
        context_parallel=getattr(args, "context_parallel", False), ulysses_degree=getattr(args, "ulysses_degree", None),
        ring_degree=getattr(args, "ring_degree", None), cfg_parallel=bool(getattr(args, "cfg_parallel", False)),
        low_memory=getattr(args, "low_memory", None),
    )  # fmt: skip


def edit_settings(args: argparse.Namespace) -> EditSettings:
    """The edit settings the flags give (those a command does not have stay unset)."""
    names = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "flow_shift", "height", "width",
             "max_area", "num_frames", "seed", "num_temporal_reasoning_steps", "preset", "cache", "cfg_batch")
    values = {name: getattr(args, name, None) for name in names}  # fmt: skip
    return EditSettings(**values, enable_temporal_reasoning=bool(getattr(args, "enable_temporal_reasoning", False)),
                        enhance_prompt=bool(getattr(args, "use_prompt_enhancer", False)))  # fmt: skip
