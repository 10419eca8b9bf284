"""From a client's options and uploaded image to a resolved :class:`~chronoedit.editing.Edit` and its outputs.

The server's settings (its flags) are every job's defaults; a job's options go on top
(:meth:`~chronoedit.editing.EditSettings.overlay`) and the application layer resolves the result like any edit, so the
server accepts exactly what the CLI accepts. Its errors name fields in the API's words. Each job owns one folder,
``RESULTS/<id>/``: ``input.png`` (the decoded upload, re-encoded), then the outputs the worker writes.
"""

from __future__ import annotations

import io
import re
import secrets
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from .. import media
from ..editing import Edit, EditSettings, ModelSpec, OutputPlan, resolve_edit, resolve_outputs
from ..errors import UserError, one_line
from ..media import INPUT_FORMATS, OUTPUT_FORMATS
from .options import EditOptions, Limits

INPUT_NAME = "input.png"
TRAJECTORY_NAME = "trajectory.mp4"
SHEET_NAME = "trajectory.png"
PROMPT_NAME = "prompt.txt"  # the enhanced prompt, when the job asked for it


class BadImage(UserError):
    """The uploaded bytes are not an image we can edit."""


class TooLarge(UserError):
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
        raise BadImage(f"the image cannot be read: {one_line(exc)}") from exc
    return media.to_rgb(image)


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


# The API's words for the fields a client cannot set by these names.
_API_WORDS = {
    "trajectory": "return_trajectory", "trajectory_sheet": "return_trajectory", "image": "image",
    "lora_path": "the server's --lora-path", "model_path": "the server's --model-path",
    "flow_shift": "the server's --flow-shift", "height": "the server's --height", "width": "the server's --width",
    "max_area": "the server's --max-area", "num_frames": "the server's --num-frames",
}  # fmt: skip


def api_word(field: str) -> str:
    """The HTTP API's name for a settings field (its option name, or the server flag that sets it)."""
    return _API_WORDS.get(field, field)


def api_message(exc: UserError) -> str:
    """A user error as one line in the API's words (``num_inference_steps``, ``return_trajectory``)."""
    return exc.render(api_word)


def job_settings(defaults: EditSettings, options: EditOptions) -> EditSettings:
    """One job's settings: the server's with the options the client set on top."""
    names = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "preset",
             "enable_temporal_reasoning", "num_temporal_reasoning_steps", "enhance_prompt", "cache", "cfg_batch")
    changes = {name: value for name in names if (value := getattr(options, name)) is not None}
    return defaults.overlay(changes)  # fmt: skip


def build_job(model: ModelSpec, defaults: EditSettings, options: EditOptions, job_dir: Path,
              limits: Limits) -> tuple[Edit, OutputPlan]:  # fmt: skip
    """The resolved edit and its outputs (UserError naming the problem); ``job_dir/input.png`` must exist."""
    edit = resolve_edit(job_settings(defaults, options), model, job_dir / INPUT_NAME)
    limits.check_steps(edit.num_inference_steps, edit.num_temporal_reasoning_steps if edit.enable_temporal_reasoning
                       else None)  # fmt: skip
    names = output_names(options)
    plan = OutputPlan(
        output=job_dir / names["result"],
        trajectory=job_dir / names["trajectory"] if "trajectory" in names else None,
        trajectory_sheet=job_dir / names["trajectory_sheet"] if "trajectory_sheet" in names else None,
        prompt_text=job_dir / PROMPT_NAME if options.enhance_prompt else None,
    )
    return edit, resolve_outputs(plan, edit)


def resolved_settings(edit: Edit) -> dict[str, Any]:
    """The exact values a job runs with (shown to the client)."""
    settings = edit.settings()
    settings["prompt_used"] = settings.pop("prompt")
    del settings["negative_prompt"], settings["preset"]
    return settings | {"loras": [[lora.path.name, lora.scale] for lora in edit.loras]}
