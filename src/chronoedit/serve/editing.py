"""From a client's options and uploaded image to a validated :class:`~chronoedit.commands.edit.EditJob`.

The server's own flags (model, device, LoRAs, ...) are the base; a job's options go on top, then everything runs
through ``chronoedit edit``'s validation, so the server accepts exactly what the CLI accepts. Each job owns one
folder, ``RESULTS/<id>/``: ``input.png`` (the decoded upload, re-encoded), then the outputs the worker writes.
"""

from __future__ import annotations

import argparse
import copy
import io
import re
import secrets
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from .. import io as cio
from ..commands import edit as edit_cmd
from .options import OUTPUT_FORMATS, EditOptions, Limits

INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # what uploads may be (no EPS/PDF/ICO renderers)
INPUT_NAME = "input.png"
TRAJECTORY_NAME = "trajectory.mp4"
SHEET_NAME = "trajectory.png"
PROMPT_NAME = "prompt.txt"  # the enhanced prompt, when the job asked for it


class BadImage(ValueError):
    """The uploaded bytes are not an image we can edit."""


class TooLarge(ValueError):
    """The upload is over a size limit."""


def decode_upload(data: bytes, limits: Limits) -> Image.Image:
    """The uploaded image, decoded, turned upright (EXIF orientation) and converted to RGB; :class:`BadImage` or
    :class:`TooLarge` otherwise."""
    if not data:
        raise BadImage("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
            _check_pixels(image, limits)
            image.load()
            _check_pixels(image, limits)
            image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise TooLarge(f"the image has too many pixels: {' '.join(str(exc).split())}") from None
    except TooLarge:
        raise
    except Image.UnidentifiedImageError:
        raise BadImage(f"the image cannot be read: not {', '.join(INPUT_FORMATS)}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"the image cannot be read: {' '.join(str(exc).split()) or type(exc).__name__}") from exc
    return cio.to_rgb(image)


def _check_pixels(image: Image.Image, limits: Limits) -> None:
    width, height = image.size
    if width * height > limits.max_input_pixels:
        raise TooLarge(
            f"the image is {width}x{height} = {width * height} pixels, over this server's limit of "
            f"{limits.max_input_pixels}"
        )


def redact(text: str, paths: dict[str, Path]) -> str:
    """``text`` with each server path replaced by its placeholder (clients never see the server's folders): as
    given, absolute and resolved, each only as a whole path ("st" is hidden in "st/results", not in "steps")."""
    forms = {form: placeholder for placeholder, path in paths.items()
             for form in (str(path), str(path.absolute()), str(path.resolve()))
             if form not in ("", ".", "/")}  # fmt: skip
    for form in sorted(forms, key=len, reverse=True):  # longest first: nested folders
        text = re.sub(rf"(?<![\w./-]){re.escape(form)}(?=[/\\'\"\s:;,)]|$)", lambda _, p=forms[form]: p, text)
    return text


def output_names(options: EditOptions) -> dict[str, str]:
    """The files a job writes in its folder, by role."""
    names = {"result": f"result.{OUTPUT_FORMATS[options.output_format]}"}
    if options.return_trajectory:
        names |= {"trajectory": TRAJECTORY_NAME, "trajectory_sheet": SHEET_NAME}
    return names


def with_seed(options: EditOptions, default: int | None = None) -> EditOptions:
    """The options with a seed, so every stored job is reproducible: the client's, else the server's ``--seed``,
    else a random one."""
    if options.seed is not None:
        return options
    return options.model_copy(update={"seed": secrets.randbits(31) if default is None else default})


def job_args(base: argparse.Namespace, options: EditOptions, job_dir: Path) -> argparse.Namespace:
    """``chronoedit edit`` arguments for one job: the server's flags with the job's options on top."""
    args = copy.copy(base)
    names = output_names(options)
    args.input, args.prompt = str(job_dir / INPUT_NAME), options.prompt
    args.output, args.output_image = job_dir / names["result"], None
    args.trajectory = job_dir / names["trajectory"] if "trajectory" in names else None
    args.trajectory_sheet = job_dir / names["trajectory_sheet"] if "trajectory_sheet" in names else None
    for name in ("negative_prompt", "seed", "num_inference_steps", "guidance_scale", "preset"):
        value = getattr(options, name)
        if value is not None:
            setattr(args, name, value)
    if options.preset:  # the request's preset is more specific than the server's defaults
        for name in ("num_inference_steps", "guidance_scale", "flow_shift", "max_area"):
            if getattr(options, name, None) is None:
                setattr(args, name, None)
    args.enable_temporal_reasoning = options.enable_temporal_reasoning
    args.num_temporal_reasoning_steps = options.num_temporal_reasoning_steps
    if not options.enable_temporal_reasoning:
        args.num_frames = None
    args.quiet = True
    return args


def api_message(exc: BaseException) -> str:
    """An error of ``chronoedit edit``'s validation as one line in the API's words (``--seed`` -> ``seed``)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for name in EditOptions.model_fields:
        text = re.sub(rf"--{name.replace('_', '-')}(?![\w-])", name, text)
    text = text.replace("--trajectory-sheet", "return_trajectory").replace("--trajectory", "return_trajectory")
    return text.replace("pass it with --lora-path", "the server has none")


def build_job(base: argparse.Namespace, options: EditOptions, job_dir: Path, limits: Limits) -> edit_cmd.EditJob:
    """The validated edit job (ValueError naming the problem in the API's words); ``job_dir/input.png`` must exist."""
    if options.return_trajectory and not options.enable_temporal_reasoning:
        raise ValueError("return_trajectory needs enable_temporal_reasoning")
    try:
        job = edit_cmd.build_edit_job(job_args(base, options, job_dir))
    except ValueError as exc:
        raise ValueError(api_message(exc)) from exc
    limits.check_steps(job.num_inference_steps, job.num_temporal_reasoning_steps if job.enable_temporal_reasoning
                       else None)  # fmt: skip
    if options.return_trajectory and job.num_temporal_reasoning_steps < 1:
        raise ValueError("return_trajectory needs at least 1 temporal reasoning step")
    return job


def resolved_settings(job: edit_cmd.EditJob) -> dict[str, Any]:
    """The exact values a job runs with (shown to the client)."""
    return {
        "prompt_used": job.prompt, "seed": job.seed, "num_inference_steps": job.num_inference_steps,
        "guidance_scale": job.guidance_scale, "flow_shift": job.flow_shift, "width": job.width,
        "height": job.height, "num_frames": job.num_frames,
        "enable_temporal_reasoning": job.enable_temporal_reasoning,
        "num_temporal_reasoning_steps": job.num_temporal_reasoning_steps,
        "loras": [[path.name, scale] for path, scale in job.loras],
    }  # fmt: skip
