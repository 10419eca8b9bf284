"""The rules an edit's values obey, each in one place: the pipeline's call checks and the application layer's settings
both apply these functions.

Errors are :class:`~chronoedit.errors.UserError`\\ s naming the fields in the settings' (and the pipeline's) own words;
each front end words them its own way (``--num-frames`` on the command line, ``num_frames`` in the API).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

from .errors import UserError

PLAIN_EDIT_FRAMES = 5
REASONING_FRAMES = 29
MIN_REASONING_FRAMES = 9  # 3 latent frames: at least one reasoning frame between the input and the edit
SIZE_MULTIPLE = 16  # VAE 8x times the transformer's 2x2 patch
MIN_MAX_AREA = SIZE_MULTIPLE * SIZE_MULTIPLE
MAX_SEED = 2**63 - 1
FLOW_SHIFT_RANGE = (0.01, 100.0)
MAX_STEPS = 1000  # the scheduler's training timesteps: more steps than this repeat timesteps
MAX_GUIDANCE = 100.0  # far past any useful guidance (5 is the default); only a typo reaches it
# The largest edit chronoedit starts without being told: a 4096-pixel side and the 2K area (the upscale preset's
# 2048x1152 fits). Above them a 14B edit needs hundreds of GB; the environment variables raise the bounds.
MAX_SIDE = 4096
MAX_AREA = 2048 * 2048
MAX_SIDE_VARIABLE, MAX_AREA_VARIABLE = "CHRONOEDIT_MAX_SIDE", "CHRONOEDIT_MAX_AREA"


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_steps(steps: Any) -> int:
    """Denoising steps: an integer from 1 to :data:`MAX_STEPS`."""
    if not is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise UserError(f"{{num_inference_steps}} must be between 1 and {MAX_STEPS}, got {steps!r}",
                        "num_inference_steps")  # fmt: skip
    return int(steps)


def check_guidance(scale: Any) -> float:
    """Classifier-free guidance scale: a number from 0 to :data:`MAX_GUIDANCE` (> 1 turns guidance on)."""
    if not _is_finite_number(scale) or not 0 <= scale <= MAX_GUIDANCE:
        raise UserError(f"{{guidance_scale}} must be between 0 and {MAX_GUIDANCE:g}, got {scale!r}", "guidance_scale")
    return float(scale)


def check_flow_shift(shift: Any) -> float:
    """The scheduler's flow shift, within :data:`FLOW_SHIFT_RANGE`."""
    low, high = FLOW_SHIFT_RANGE
    if not _is_finite_number(shift) or not low <= shift <= high:
        raise UserError(f"{{flow_shift}} must be between {low:g} and {high:g}, got {shift!r}", "flow_shift")
    return float(shift)


def check_seed(seed: Any) -> int:
    """A random seed in [0, 2**63 - 1] (what ``torch.Generator.manual_seed`` takes)."""
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"{{seed}} must be between 0 and 2**63 - 1, got {seed!r}", "seed")
    return int(seed)


def check_size(width: Any, height: Any, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(width, height), given together, each a multiple of ``multiple`` and at least that, within
    :func:`size_bounds`."""
    if (width is None) != (height is None):
        raise UserError("{height} and {width} must be given together (or neither, for automatic sizing)",
                        "height", ("width",))  # fmt: skip
    bad = [f"{name} {value}" for name, value in (("height", height), ("width", width))
           if not is_int(value) or value < multiple or value % multiple]  # fmt: skip
    if bad:
        raise UserError(
            f"{{height}} and {{width}} must be multiples of {multiple} and at least {multiple}, got {height}x{width} "
            f"(height x width): bad {' and '.join(bad)}",
            "height" if bad[0].startswith("height") else "width", ("height", "width"),
        )  # fmt: skip
    max_side, max_area = size_bounds()
    if max(height, width) > max_side or height * width > max_area:
        raise UserError(
            f"the size {height}x{width} ({{height}} x {{width}}) is over the largest edit, a {max_side}-pixel side "
            f"and {max_area} pixels (set {MAX_SIDE_VARIABLE} and {MAX_AREA_VARIABLE} to allow more)",
            "height", ("width",),
        )  # fmt: skip
    return int(width), int(height)


def check_max_area(area: Any) -> int:
    """The pixel area of automatic sizing: from 16x16 to the bound of :func:`size_bounds`."""
    largest = size_bounds()[1]
    if not is_int(area) or not MIN_MAX_AREA <= area <= largest:
        raise UserError(f"{{max_area}} must be between {MIN_MAX_AREA} and {largest} pixels (set {MAX_AREA_VARIABLE} "
                        f"to allow more), got {area!r}", "max_area")  # fmt: skip
    return int(area)


def size_bounds() -> tuple[int, int]:
    """(largest side, largest area) of an edit: :data:`MAX_SIDE` and :data:`MAX_AREA`, or the environment's."""
    return _bound(MAX_SIDE_VARIABLE, MAX_SIDE), _bound(MAX_AREA_VARIABLE, MAX_AREA)


def _bound(variable: str, default: int) -> int:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < SIZE_MULTIPLE:
        raise UserError(f"the environment variable {variable} must be a whole number of pixels >= {SIZE_MULTIPLE}, "
                        f"got {text!r}")  # fmt: skip
    return int(text)


def resolve_frames(reasoning: bool, num_frames: Any, steps: int, reasoning_steps: Any) -> tuple[int, int]:
    """(num_frames, reasoning steps) for an edit with or without temporal reasoning; nothing is silently replaced.

    Defaults: 29 frames and every step with reasoning; without it 5 frames, 0 reasoning steps, and neither may be set.
    """
    if not reasoning:
        if reasoning_steps is not None:
            raise UserError("{num_temporal_reasoning_steps} needs {enable_temporal_reasoning}",
                            "num_temporal_reasoning_steps", ("enable_temporal_reasoning",))  # fmt: skip
        if num_frames is not None and num_frames != PLAIN_EDIT_FRAMES:
            raise UserError(f"{{num_frames}} {num_frames} needs {{enable_temporal_reasoning}} (an edit without "
                            f"reasoning has {PLAIN_EDIT_FRAMES} frames)",
                            "num_frames", ("enable_temporal_reasoning",))  # fmt: skip
        return PLAIN_EDIT_FRAMES, 0
    frames = REASONING_FRAMES if num_frames is None else num_frames
    if not is_int(frames) or frames < MIN_REASONING_FRAMES or (frames - 1) % 4:
        raise UserError(f"{{num_frames}} must be 4k+1 and at least {MIN_REASONING_FRAMES} with temporal reasoning "
                        f"(e.g. {REASONING_FRAMES}), got {frames!r}", "num_frames")  # fmt: skip
    reasoning_steps = steps if reasoning_steps is None else reasoning_steps
    if not is_int(reasoning_steps) or not 0 <= reasoning_steps <= steps:
        raise UserError(f"{{num_temporal_reasoning_steps}} must be between 0 and {{num_inference_steps}} ({steps}), "
                        f"got {reasoning_steps!r}", "num_temporal_reasoning_steps",
                        ("num_inference_steps",))  # fmt: skip
    return int(frames), int(reasoning_steps)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
