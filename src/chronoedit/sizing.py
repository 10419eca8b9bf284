"""Edit sizes: NVIDIA's aspect-preserving automatic size, the multiple-of-16 rule, and the resize to that size."""

from __future__ import annotations

import math

from PIL import Image

from .errors import UserError
from .media import to_rgb

DEFAULT_MAX_AREA = 720 * 1280


def auto_size(width: int, height: int, max_area: int = DEFAULT_MAX_AREA, multiple: int = 16) -> tuple[int, int]:
    """NVIDIA's sizing recipe: keep the aspect ratio at ``max_area`` pixels, snap down to ``multiple``.

    ``ar = H / W; h = round(sqrt(A * ar)) // m * m; w = round(sqrt(A / ar)) // m * m``; never below ``multiple``, and
    for extreme aspect ratios the long side is capped so that the area stays within ``max_area``. Returns
    ``(width, height)``.
    """
    if width <= 0 or height <= 0:
        raise UserError(f"image size must be positive, got {width}x{height}")
    if max_area <= 0 or multiple <= 0:
        raise UserError(f"max_area and multiple must be positive, got {max_area} and {multiple}")
    aspect = height / width
    new_height = max(multiple, round(math.sqrt(max_area * aspect)) // multiple * multiple)
    new_width = max(multiple, round(math.sqrt(max_area / aspect)) // multiple * multiple)
    # A side raised to the minimum must not leave the other at a size that blows the area (a 10000x1 image).
    longest = max(multiple, max_area // multiple // multiple * multiple)
    return min(new_width, longest), min(new_height, longest)


def check_size(width: int, height: int, multiple: int = 16, minimum: int = 16) -> None:
    """Raise UserError unless both sides are multiples of ``multiple`` and at least ``minimum``."""
    bad = [
        f"{name} {value}"
        for name, value in (("height", height), ("width", width))
        if not isinstance(value, int) or value < minimum or value % multiple
    ]
    if bad:
        raise UserError(
            f"height and width must be multiples of {multiple} and at least {minimum}, "
            f"got {height}x{width} (height x width): bad {' and '.join(bad)}"
        )


def resize_for_edit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to exactly ``(width, height)`` with bicubic, as NVIDIA's script does (PIL's ``resize`` default)."""
    image = to_rgb(image)
    if image.size == (width, height):
        return image.copy()
    return image.resize((width, height), resample=Image.Resampling.BICUBIC)


