"""``chronoedit edit``: edit one image with a text instruction.

``chronoedit edit`` takes the flags of NVIDIA's ``run_inference_diffusers.py``. Everything that can be checked without
the model (input image, output paths, sizes, frame counts, step counts) is checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import editing
from ..editing import Edit, ModelSpec, OutputPlan, Report
from ..errors import UserError
from .enhance import add_enhancer_args, enhancer_config
from .flags import (
    add_lora_args,
    add_parallel_args,
    add_reasoning_args,
    add_runtime_args,
    add_sampling_args,
    edit_settings,
    model_spec,
)

DEFAULT_OUTPUT = Path("outputs/edit.png")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``edit`` subcommand and its flags; the parsed arguments carry :func:`handle` as ``handler``."""
    edit = subparsers.add_parser(
        "edit",
        help="edit one image with a text instruction",
        description="Edit an image with a text instruction (NVIDIA's flag names).",
    )
    _add_io_args(edit)
    add_sampling_args(edit)
    _add_reasoning_args(edit)
    add_runtime_args(edit)
    add_parallel_args(edit)
    add_lora_args(edit)
    add_enhancer_args(edit)
    edit.set_defaults(handler=handle)
    return edit


def handle(args: argparse.Namespace) -> int:
    """Run ``chronoedit edit`` on parsed arguments: check everything, enhance the prompt if asked (the VLM is
    released before the editing model loads), edit, write."""
    enhancer = enhancer_config(args)
    report = console_report(args.quiet)
    spec, edit, plan = resolve(args)
    if enhancer is not None and spec.layout is not None:  # each rank's enhancer could word the prompt differently
        raise UserError("{use_prompt_enhancer} does not run under torchrun: enhance the prompt first (chronoedit "
                        "enhance) and pass it with {prompt}", "use_prompt_enhancer", ("prompt",))  # fmt: skip
    if args.offload_model and spec.device == "cpu":
        report.note("--offload_model has no effect on the CPU")
    if enhancer is not None:
        edit = editing.enhance(edit, enhancer, report, device=spec.device)
        print(f"enhanced prompt: {edit.instruction}", flush=True)
    editing.run_edit(spec, edit, plan, report)
    return 0


def resolve(args: argparse.Namespace) -> tuple[ModelSpec, Edit, OutputPlan]:
    """The model, the edit and its outputs, every flag checked (output folders are created last)."""
    spec = model_spec(args)
    edit = editing.resolve_edit(edit_settings(args), spec, args.input)
    output = args.output if args.output is not None or args.output_image is not None else DEFAULT_OUTPUT
    plan = OutputPlan(output=output, output_image=args.output_image, trajectory=args.trajectory,
                      trajectory_sheet=args.trajectory_sheet)  # fmt: skip
    return spec, edit, editing.resolve_outputs(plan, edit)


def console_report(quiet: bool) -> Report:
    """Stage lines and notes on stderr (above a live progress bar; none with --quiet, but notes), written files on
    stdout."""

    def stage(message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"chronoedit: {message}", file=sys.stderr)

    def note(message: str) -> None:
        print(f"chronoedit: note: {message}", file=sys.stderr, flush=True)

    def wrote(line: str) -> None:
        print(line, flush=True)

    return Report(stage=editing.QUIET.stage if quiet else stage, note=note, wrote=wrote, progress_bar=not quiet)


def _add_io_args(edit: argparse.ArgumentParser) -> None:
    """Input image, prompts and output paths."""
    group = edit.add_argument_group("input and output")
    group.add_argument("-i", "--input", metavar="IMAGE", help="input image (default: the shipped example image)")
    group.add_argument("-p", "--prompt", metavar="TEXT", help="edit instruction (required unless --model-path demo)")
    group.add_argument("--negative-prompt", metavar="TEXT", default=None, help="negative prompt (default: empty)")
    group.add_argument(
        "-o", "--output", type=Path, metavar="PATH", default=None,
        help=f"edited image (.png/.jpg/.jpeg/.webp) or video (.mp4); default {DEFAULT_OUTPUT} unless --output-image "
        "is given; with reasoning an .mp4 is the trajectory video unless --trajectory is given",
    )  # fmt: skip
    group.add_argument("--output-image", type=Path, metavar="PATH", help="also write the edited image here")


def _add_reasoning_args(edit: argparse.ArgumentParser) -> None:
    """Temporal reasoning, frame count and trajectory outputs."""
    group = add_reasoning_args(edit)
    group.add_argument("--trajectory", type=Path, metavar="PATH", help="write the reasoning trajectory video (.mp4)")
    group.add_argument("--trajectory-sheet", type=Path, metavar="PATH", default=None,
                       help="write the reasoning trajectory as a contact sheet image (.png)")
