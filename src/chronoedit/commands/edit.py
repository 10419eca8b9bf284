"""``chronoedit edit``: edit one image with a text instruction.

``chronoedit edit`` takes the flags of NVIDIA's ``run_inference_diffusers.py``. Everything that can be checked without
the model (input image, output paths, sizes, frame counts, step counts) is checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .. import io as cio
from ..loading import looks_like_repo_id
from ..presets import PRESETS, find_preset_loras
from ..request import MIN_REASONING_FRAMES, REASONING_FRAMES
from ..request import PLAIN_EDIT_FRAMES as EDIT_FRAMES
from .enhance import add_enhancer_args, check_enhancer_args, enhance_for_edit

DEMO = "demo"
DEMO_PROMPT = "put a red hat on the cup"
DEMO_MAX_AREA = 256 * 256
DEMO_STEPS = 4
DEFAULT_STEPS = 50
DEFAULT_OUTPUT = Path("outputs/edit.png")
VIDEO_FPS = 8
MODEL_PATH_ENV = "CHRONOEDIT_MODEL_PATH"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEMO_NOTICE = (
    "chronoedit: note: the demo model has random weights, so its output is noise; for real edits point --model-path "
    f"(or {MODEL_PATH_ENV}) at a ChronoEdit diffusers checkpoint folder, e.g. a saved nvidia/ChronoEdit-14B-Diffusers"
)


@dataclass
class EditJob:
    """A fully validated ``chronoedit edit`` invocation; ``image`` is already resized to ``width`` x ``height``.

    Not to be confused with :class:`chronoedit.request.EditRequest`, the pipeline's own checked call arguments.
    """

    image: Image.Image
    input_name: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    seed: int
    model_path: str
    device: str
    dtype: str
    offload_model: bool
    enable_temporal_reasoning: bool
    num_temporal_reasoning_steps: int
    output: Path | None
    output_image: Path | None
    trajectory: Path | None
    trajectory_sheet: Path | None
    quiet: bool
    loras: list[tuple[Path, float]] = field(default_factory=list)
    transformer_path: Path | None = None
    lora_strict: bool = True

    @property
    def return_trajectory(self) -> bool:
        """Ask for the trajectory when reasoning runs for at least one step and a video or trajectory is wanted."""
        wants_video = self.output is not None and cio.output_kind(self.output) == "video"
        wanted = wants_video or self.trajectory is not None or self.trajectory_sheet is not None
        return self.enable_temporal_reasoning and self.num_temporal_reasoning_steps >= 1 and wanted


# ------------------------------------------------------------------------------------------------------------ parsing
def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``edit`` subcommand and its flags; the parsed arguments carry :func:`handle` as ``handler``."""
    edit = subparsers.add_parser(
        "edit",
        help="edit one image with a text instruction",
        description="Edit an image with a text instruction (NVIDIA's flag names).",
    )
    _add_io_args(edit)
    _add_sampling_args(edit)
    _add_reasoning_args(edit)
    _add_runtime_args(edit)
    _add_lora_args(edit)
    add_enhancer_args(edit)
    edit.set_defaults(handler=handle)
    return edit


def handle(args: argparse.Namespace) -> int:
    """Run ``chronoedit edit`` on parsed arguments; errors propagate to the CLI's error policy."""
    enhancer = check_enhancer_args(args)  # before anything loads
    instruction = args.prompt
    job = build_edit_job(args)
    if enhancer is not None:  # the VLM is loaded, used and released before the editing model loads
        enhance_for_edit(job, enhancer, DEMO_PROMPT if instruction is None else instruction, args.preset)
    run_edit(job)
    return 0


def _add_io_args(edit: argparse.ArgumentParser) -> None:
    """Input image, prompts and output paths."""
    group = edit.add_argument_group("input and output")
    group.add_argument("-i", "--input", metavar="IMAGE", help="input image (default: the shipped example image)")
    group.add_argument("-p", "--prompt", metavar="TEXT", help="edit instruction (required unless --model-path demo)")
    group.add_argument("--negative-prompt", metavar="TEXT", default=None, help="negative prompt (default: empty)")
    group.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="PATH",
        default=None,
        help=f"edited image (.png/.jpg/.jpeg/.webp) or video (.mp4); default {DEFAULT_OUTPUT} "
        "unless --output-image is given; with reasoning an .mp4 is the trajectory video "
        "unless --trajectory is given",
    )
    group.add_argument("--output-image", type=Path, metavar="PATH", help="also write the edited image here")


def _add_sampling_args(edit: argparse.ArgumentParser) -> None:
    """Steps, guidance, flow shift, output size and seed."""
    group = edit.add_argument_group("sampling")
    group.add_argument(
        "--num-inference-steps",
        type=int,
        metavar="N",
        default=None,
        help=f"denoising steps (default {DEFAULT_STEPS}; {DEMO_STEPS} with the demo model)",
    )
    group.add_argument("--guidance-scale", type=float, metavar="G", help="guidance scale (default 5.0)")
    group.add_argument("--flow-shift", type=float, metavar="S", help="scheduler flow shift (default 5.0)")
    group.add_argument("--height", type=int, metavar="H", help="output height, a multiple of 16 (with --width)")
    group.add_argument("--width", type=int, metavar="W", help="output width, a multiple of 16 (with --height)")
    group.add_argument(
        "--max-area",
        type=int,
        metavar="PIXELS",
        default=None,
        help="pixel area for automatic sizing that keeps the aspect ratio "
        "(default 720*1280; 256*256 with the demo model)",
    )
    group.add_argument("--seed", type=int, metavar="N", default=0, help="random seed (default 0)")


def _add_reasoning_args(edit: argparse.ArgumentParser) -> None:
    """Temporal reasoning, frame count and trajectory outputs."""
    group = edit.add_argument_group("temporal reasoning")
    group.add_argument(
        "--enable-temporal-reasoning",
        action="store_true",
        help="imagine the edit as a video first (29 frames) for more physically plausible edits",
    )
    group.add_argument(
        "--num-temporal-reasoning-steps",
        type=int,
        metavar="N",
        default=None,
        help="steps that keep the reasoning frames (default: all steps)",
    )
    group.add_argument(
        "--num-frames",
        type=int,
        metavar="N",
        default=None,
        help=f"frames, 4k+1 (default {REASONING_FRAMES} with reasoning, {EDIT_FRAMES} without)",
    )
    group.add_argument("--trajectory", type=Path, metavar="PATH", help="write the reasoning trajectory video (.mp4)")
    group.add_argument(
        "--trajectory-sheet",
        type=Path,
        metavar="PATH",
        default=None,
        help="write the reasoning trajectory as a contact sheet image (.png)",
    )


def _add_runtime_args(edit: argparse.ArgumentParser) -> None:
    """Checkpoint, device, dtype, offloading and verbosity."""
    group = edit.add_argument_group("model and device")
    group.add_argument(
        "--model-path",
        metavar="PATH",
        default=None,
        help=f"ChronoEdit diffusers checkpoint folder (default: ${MODEL_PATH_ENV}, else '{DEMO}', "
        "a tiny random-weight model whose output is noise)",
    )
    group.add_argument(
        "--transformer", type=Path, metavar="PATH",
        help="use this transformer instead of the model folder's: a single .safetensors file (diffusers or original "
        "Wan/ComfyUI names; fp8 kept quantized), a .gguf file (Q8_0, Q4_K, ...; kept quantized, each layer "
        "dequantized as it runs) or a transformer folder; the other components come from --model-path",
    )  # fmt: skip
    group.add_argument("--device", metavar="DEVICE", help="torch device (default: cuda if available, else cpu)")
    group.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="model dtype (default: bf16 on GPU, fp32 on CPU and for the demo model)",
    )
    group.add_argument(
        "--offload_model",
        "--offload-model",
        dest="offload_model",
        action="store_true",
        help="keep components on the CPU and move each to the GPU only while it runs",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bar or stage messages")


# --------------------------------------------------------------------------------------------------------- validation
def build_edit_job(args: argparse.Namespace) -> EditJob:
    """Check every flag that can be checked without the model; load and resize the input image."""
    model_path = args.model_path or os.environ.get(MODEL_PATH_ENV) or DEMO
    demo = model_path == DEMO
    _apply_preset(args)
    prompt = args.prompt if args.prompt is not None else (DEMO_PROMPT if demo else None)
    if prompt is None or not prompt.strip():
        raise ValueError("--prompt is required (it may only be left out with --model-path demo)")
    steps = _resolve_steps(args, demo)
    reasoning, reasoning_steps, num_frames = _resolve_reasoning(args, steps)
    outputs = _resolve_outputs(args, reasoning, reasoning_steps)
    _check_size_flags(args)
    device, dtype = _resolve_device(args, demo)
    if not demo:
        _check_model_path(model_path)
    input_name, image = _read_input(args.input)
    width, height = _resolve_size(args, image, demo)
    for path in outputs.values():
        if path is not None:
            cio.check_writable(path)  # last: it may create the output folder
    if args.offload_model and device == "cpu" and not args.quiet:
        print("chronoedit: note: --offload_model has no effect on the CPU", file=sys.stderr)
    loras = _resolve_loras(args, None if demo else Path(model_path))
    return EditJob(
        image=cio.resize_for_edit(image, width, height),
        input_name=input_name,
        prompt=prompt,
        negative_prompt=args.negative_prompt,
        width=width,
        height=height,
        num_frames=num_frames,
        num_inference_steps=steps,
        guidance_scale=args.guidance_scale,
        flow_shift=args.flow_shift,
        seed=args.seed,
        model_path=model_path,
        device=device,
        dtype=dtype,
        offload_model=args.offload_model and device != "cpu",
        enable_temporal_reasoning=reasoning,
        num_temporal_reasoning_steps=reasoning_steps,
        **outputs,
        quiet=args.quiet,
        loras=loras,
        lora_strict=not args.lora_allow_unmatched,
        transformer_path=_check_transformer_path(args.transformer),
    )


def _add_lora_args(edit: argparse.ArgumentParser) -> None:
    """LoRAs, each with its own scale, and the presets of NVIDIA's companion LoRAs."""
    group = edit.add_argument_group("LoRAs and presets")
    group.add_argument(
        "--lora-path", nargs="+", metavar="FILE[:SCALE]", default=[],
        help="LoRA safetensors files (any layout: diffusers, Wan/ComfyUI, DiffSynth, musubi), each optionally with "
        "its own scale, e.g. a.safetensors:0.8 b.safetensors",
    )  # fmt: skip
    group.add_argument("--lora-scale", type=float, default=1.0, help="scale of LoRAs given without one (1.0)")
    group.add_argument(
        "--lora-allow-unmatched", action="store_true",
        help="warn about LoRA keys that match no layer instead of failing",
    )  # fmt: skip
    group.add_argument(
        "--preset", choices=sorted(PRESETS),
        help="; ".join(p.describe() for p in PRESETS.values()) + ". Explicit flags override the preset's values.",
    )  # fmt: skip


def _apply_preset(args: argparse.Namespace) -> None:
    """Fill the sampling flags the user left out from the preset, then from the defaults; wrap the prompt."""
    preset = PRESETS.get(args.preset) if args.preset else None
    for flag, default in (("num_inference_steps", None), ("guidance_scale", 5.0), ("flow_shift", 5.0),
                          ("max_area", None)):  # fmt: skip
        if getattr(args, flag) is None:
            value = getattr(preset, flag, None) if preset is not None else None
            setattr(args, flag, value if value is not None else default)
    if preset is not None and args.prompt is not None:
        args.prompt = preset.prompt(args.prompt)


def parse_lora_arg(text: str, default_scale: float) -> tuple[Path, float]:
    """``file.safetensors:0.8`` -> (path, 0.8); without a numeric suffix the default scale."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(text), default_scale


def _resolve_loras(args: argparse.Namespace, checkpoint: Path | None) -> list[tuple[Path, float]]:
    """The user's LoRAs (which must exist) plus those the preset needs from the checkpoint's lora/ folder."""
    loras = [parse_lora_arg(text, args.lora_scale) for text in args.lora_path]
    for path, _ in loras:
        if not path.exists():
            raise FileNotFoundError(f"LoRA file not found: {path}")
    if args.preset:
        local = checkpoint if checkpoint is not None and checkpoint.is_dir() else None
        extra = find_preset_loras(PRESETS[args.preset], [p for p, _ in loras], local)
        loras += [(path, args.lora_scale) for path in extra]
    return loras


def _resolve_steps(args: argparse.Namespace, demo: bool) -> int:
    """Denoising steps (default depends on the demo model); also checks guidance scale and flow shift."""
    steps = args.num_inference_steps
    if steps is None:
        steps = DEMO_STEPS if demo else DEFAULT_STEPS
    if steps < 1:
        raise ValueError(f"--num-inference-steps must be at least 1, got {steps}")
    if not math.isfinite(args.guidance_scale) or args.guidance_scale < 0:
        raise ValueError(f"--guidance-scale must be a finite number >= 0, got {args.guidance_scale}")
    if not math.isfinite(args.flow_shift) or not 0.01 <= args.flow_shift <= 100:
        raise ValueError(f"--flow-shift must be between 0.01 and 100, got {args.flow_shift}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    return steps


def _resolve_reasoning(args: argparse.Namespace, steps: int) -> tuple[bool, int, int]:
    """(enabled, reasoning steps, num_frames), checked against each other."""
    if not args.enable_temporal_reasoning:
        if args.num_temporal_reasoning_steps is not None:
            raise ValueError("--num-temporal-reasoning-steps needs --enable-temporal-reasoning")
        if args.num_frames is not None and args.num_frames != EDIT_FRAMES:
            raise ValueError(
                f"--num-frames {args.num_frames} needs --enable-temporal-reasoning "
                f"(an edit without reasoning has {EDIT_FRAMES} frames)"
            )
        return False, 0, EDIT_FRAMES
    frames = args.num_frames if args.num_frames is not None else REASONING_FRAMES
    if frames < MIN_REASONING_FRAMES or (frames - 1) % 4:
        raise ValueError(
            f"with --enable-temporal-reasoning, --num-frames must be 4k+1 and at least 9 "
            f"(e.g. {REASONING_FRAMES}), got {frames}"
        )
    reasoning_steps = steps if args.num_temporal_reasoning_steps is None else args.num_temporal_reasoning_steps
    if not 0 <= reasoning_steps <= steps:
        raise ValueError(
            f"--num-temporal-reasoning-steps must be between 0 and --num-inference-steps ({steps}), "
            f"got {reasoning_steps}"
        )
    return True, reasoning_steps, frames


def _resolve_outputs(args: argparse.Namespace, reasoning: bool, reasoning_steps: int) -> dict[str, Path | None]:
    """Output paths by role; suffixes match their role and paths are distinct (writability is checked later)."""
    output = args.output if args.output is not None or args.output_image is not None else DEFAULT_OUTPUT
    outputs = {
        "output": output,
        "output_image": args.output_image,
        "trajectory": args.trajectory,
        "trajectory_sheet": args.trajectory_sheet,
    }
    if (args.trajectory or args.trajectory_sheet) and not (reasoning and reasoning_steps >= 1):
        flag = "--trajectory" if args.trajectory else "--trajectory-sheet"
        raise ValueError(f"{flag} needs --enable-temporal-reasoning with at least 1 reasoning step")
    required = {"output_image": "image", "trajectory": "video", "trajectory_sheet": "image"}
    seen: dict[Path, str] = {}
    for role, path in outputs.items():
        if path is None:
            continue
        flag = "--" + role.replace("_", "-")
        kind = cio.output_kind(path)
        if role in required and kind != required[role]:
            raise ValueError(f"{flag} {path} must be {'a .mp4 video' if kind == 'image' else 'an image'}")
        key = Path(os.path.abspath(path))
        if key in seen:
            raise ValueError(f"{flag} and {seen[key]} both write {path}")
        seen[key] = flag
    return outputs


def _check_size_flags(args: argparse.Namespace) -> None:
    """--height/--width come together as multiples of 16; --max-area is at least 16x16."""
    if (args.height is None) != (args.width is None):
        raise ValueError("--height and --width must be given together (or neither, for automatic sizing)")
    if args.height is not None:
        cio.check_size(args.width, args.height)
    if args.max_area is not None and args.max_area < 16 * 16:
        raise ValueError(f"--max-area must be at least 256 pixels, got {args.max_area}")


def _resolve_size(args: argparse.Namespace, image: Image.Image, demo: bool) -> tuple[int, int]:
    """(width, height): the explicit size, else the image's aspect ratio within the pixel area."""
    if args.height is not None:
        return args.width, args.height
    max_area = args.max_area if args.max_area is not None else (DEMO_MAX_AREA if demo else cio.DEFAULT_MAX_AREA)
    return cio.auto_size(*image.size, max_area=max_area)


def _resolve_device(args: argparse.Namespace, demo: bool) -> tuple[str, str]:
    """(device, dtype): default cuda when available; bf16 on GPU, fp32 on CPU and for the demo model."""
    import torch

    if args.device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        try:
            kind = torch.device(args.device).type
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"unknown --device {args.device!r}") from err
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
        if kind == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {args.device}: MPS is not available on this machine (use --device cpu)")
        device = args.device
    if args.dtype is not None:
        return device, args.dtype
    return device, "fp32" if demo or device == "cpu" else "bf16"


def _check_transformer_path(path: Path | None) -> Path | None:
    """``--transformer``: an existing .safetensors file or transformer folder."""
    if path is None:
        return None
    if not path.exists():
        raise FileNotFoundError(f"--transformer not found: {path}")
    if path.is_file() and path.suffix not in (".safetensors", ".gguf"):
        raise ValueError(f"--transformer must be a .safetensors or .gguf file or a transformer folder, got {path}")
    return path


def _check_model_path(model_path: str) -> None:
    """Fail fast on a local path that does not exist (anything shaped like owner/name is left to the loader)."""
    path = Path(model_path).expanduser()
    if not path.exists() and not looks_like_repo_id(model_path):
        raise FileNotFoundError(
            f"model folder not found: {model_path} (point --model-path or {MODEL_PATH_ENV} at a "
            "ChronoEdit diffusers checkpoint folder, or use --model-path demo)"
        )


def _read_input(path: str | None) -> tuple[str, Image.Image]:
    """The input image by path, else the shipped example image (drawn on the fly if the file is missing)."""
    if path is not None:
        return path, cio.load_image(path)
    from importlib import resources

    example = resources.files("chronoedit").joinpath("assets/example.png")
    if example.is_file():
        with resources.as_file(example) as example_path:
            return "example image", cio.load_image(example_path)
    from ..demo import draw_example_image  # the same picture, drawn, when the asset is missing

    return "example image (drawn)", draw_example_image()


# ---------------------------------------------------------------------------------------------------------- running
def _stage(job: EditJob, message: str) -> None:
    """Print a stage message to stderr unless --quiet."""
    if not job.quiet:
        from tqdm.auto import tqdm

        tqdm.write(f"chronoedit: {message}", file=sys.stderr)  # above a progress bar that is still drawn


def resolve_model_path(job: EditJob) -> str:
    """The checkpoint to load; for ``demo`` the tiny random-weight checkpoint is created if needed."""
    if job.model_path != DEMO:
        return job.model_path
    from ..demo import ensure_demo_checkpoint

    print(DEMO_NOTICE, file=sys.stderr, flush=True)
    return str(ensure_demo_checkpoint())


def _quiet_libraries(quiet: bool) -> None:
    """No weight-loading bars from transformers / diffusers (the stage line says it); with --quiet no warnings."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging_module in (diffusers_logging, transformers_logging):
        logging_module.disable_progress_bar()
        if quiet:
            logging_module.set_verbosity_error()


def load_pipeline(job: EditJob) -> Any:
    """ChronoEditPipeline from the job's checkpoint, on its device (or offloaded) with its flow shift."""
    import torch

    from .. import ChronoEditPipeline

    path = resolve_model_path(job)
    if job.device == "cpu" and job.model_path != DEMO:
        _stage(job, "note: a real checkpoint on the CPU takes hours per edit and ~70 GB of RAM in fp32 (use a GPU)")
    _stage(job, f"loading model from {path} ({job.dtype}, {job.device})")
    _quiet_libraries(job.quiet)
    dtype = getattr(torch, DTYPES[job.dtype])
    transformer = None
    if job.transformer_path is not None:
        from ..loading import load_transformer

        _stage(job, f"loading transformer from {job.transformer_path}")
        transformer = load_transformer(job.transformer_path, torch_dtype=dtype)
    pipe = ChronoEditPipeline.from_pretrained(path, torch_dtype=dtype, transformer=transformer)
    pipe.set_flow_shift(job.flow_shift)
    _load_loras(pipe, job)
    if job.offload_model:
        pipe.enable_model_cpu_offload(device=job.device)
    else:
        pipe.to(job.device)
    pipe.set_progress_bar_config(disable=job.quiet)
    return pipe


def _load_loras(pipe: Any, job: EditJob) -> None:
    """Attach every LoRA with its own scale, all active together."""
    names = []
    for path, scale in job.loras:
        _stage(job, f"loading LoRA {path} (scale {scale:g})")
        names.append(pipe.load_lora_weights(str(path), scale=scale, strict=job.lora_strict))
    if names:
        pipe.set_adapters(names, [scale for _, scale in job.loras])


def generate(pipe: Any, job: EditJob, on_step: Callable[[int, int], None] | None = None) -> Any:
    """Run the edit; the result's frames (and trajectory, if any) are checked to be finite. ``on_step(done, total)``
    is called after every denoising step."""
    import torch

    def callback(_pipe: Any, step: int, _t: Any, _tensors: dict[str, Any]) -> dict[str, Any]:
        if on_step is not None:
            on_step(step + 1, job.num_inference_steps)
        if step + 1 == job.num_inference_steps:  # the VAE decode that follows takes a while on large edits
            _stage(job, "decoding the frames with the VAE")
        return {}

    reasoning = (
        f", temporal reasoning for {job.num_temporal_reasoning_steps} steps" if job.enable_temporal_reasoning else ""
    )
    _stage(
        job,
        f"editing {job.input_name} at {job.width}x{job.height}: "
        f"{job.num_inference_steps} steps, {job.num_frames} frames{reasoning}",
    )
    out = pipe(
        image=job.image,
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        height=job.height,
        width=job.width,
        num_frames=job.num_frames,
        num_inference_steps=job.num_inference_steps,
        guidance_scale=job.guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(job.seed),
        output_type="np",
        enable_temporal_reasoning=job.enable_temporal_reasoning,
        num_temporal_reasoning_steps=job.num_temporal_reasoning_steps,
        return_trajectory=job.return_trajectory,
        callback_on_step_end=callback,
    )
    cio.check_finite(out.frames)
    if getattr(out, "trajectory", None) is not None:
        cio.check_finite(out.trajectory, "trajectory")
    return out


def write_outputs(job: EditJob, out: Any, echo: bool = True) -> list[str]:
    """Write every requested output atomically; return one 'wrote ...' line per file (also printed as written,
    unless ``echo`` is False)."""
    frames = out.frames[0]
    trajectory = out.trajectory[0] if getattr(out, "trajectory", None) is not None else None
    edited = cio.frames_to_pil(frames[-1:])[0]
    if (job.trajectory or job.trajectory_sheet) and trajectory is None:
        raise ValueError("the pipeline returned no trajectory; nothing was written")
    lines: list[str] = []

    def report(line: str) -> None:
        """Record and print one output line."""
        lines.append(line)
        if echo:
            print(line, flush=True)

    if job.output is not None and cio.output_kind(job.output) == "image":
        report(f"wrote edited image: {cio.save_image(edited, job.output)} ({edited.width}x{edited.height})")
    elif job.output is not None:
        use_trajectory = trajectory is not None and job.trajectory is None
        video = trajectory if use_trajectory else frames
        cio.save_video(video, job.output, fps=VIDEO_FPS)
        report(f"wrote {'trajectory video' if use_trajectory else 'video'}: {job.output} ({len(video)} frames)")
    if job.output_image is not None:
        report(f"wrote edited image: {cio.save_image(edited, job.output_image)} ({edited.width}x{edited.height})")
    if job.trajectory is not None:
        report(
            f"wrote trajectory video: {cio.save_video(trajectory, job.trajectory, fps=VIDEO_FPS)} "
            f"({len(trajectory)} frames)"
        )
    if job.trajectory_sheet is not None:
        report(
            f"wrote trajectory contact sheet: {cio.save_contact_sheet(trajectory, job.trajectory_sheet)} "
            f"({len(trajectory)} frames)"
        )
    return lines


def run_edit(job: EditJob) -> list[str]:
    """Load the model, run the edit, write the outputs."""
    pipe = load_pipeline(job)
    out = generate(pipe, job)
    return write_outputs(job, out)
