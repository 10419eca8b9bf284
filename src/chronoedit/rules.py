"""The rules an edit's values obey, each in one place: the pipeline's call checks and the application layer's settings
both apply these functions.

Errors are :class:`~chronoedit.errors.UserError`\\ s naming the fields in the settings' (and the pipeline's) own words;
each front end words them its own way (``--num-frames`` on the command line, ``num_frames`` in the API).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import UserError

PLAIN_EDIT_FRAMES = 5
REASONING_FRAMES = 29
MIN_REASONING_FRAMES = 9  # 3 latent frames: at least one reasoning frame between the input and the edit
SIZE_MULTIPLE = 16  # VAE 8x times the transformer's 2x2 patch
MIN_MAX_AREA = SIZE_MULTIPLE * SIZE_MULTIPLE
MAX_SEED = 2**63 - 1
FLOW_SHIFT_RANGE = (0.01, 100.0)


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_steps(steps: Any) -> int:
    """Denoising steps: an integer >= 1."""
    if not is_int(steps) or steps < 1:
        raise UserError(f"{{num_inference_steps}} must be at least 1, got {steps!r}", "num_inference_steps")
    return int(steps)


def check_guidance(scale: Any) -> float:
    """Classifier-free guidance scale: a finite number >= 0 (> 1 turns guidance on)."""
    if not _is_finite_number(scale) or scale < 0:
        raise UserError(f"{{guidance_scale}} must be a finite number >= 0, got {scale!r}", "guidance_scale")
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
    """(width, height), given together, each a multiple of ``multiple`` and at least that."""
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
    return int(width), int(height)


def check_max_area(area: Any) -> int:
    """The pixel area of automatic sizing: at least 16x16."""
    if not is_int(area) or area < MIN_MAX_AREA:
        raise UserError(f"{{max_area}} must be at least {MIN_MAX_AREA} pixels, got {area!r}", "max_area")
    return int(area)


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
