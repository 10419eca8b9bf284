"""Images and videos in and out: reading inputs, sizing, and atomic writers.

Everything here is plain PIL / numpy / imageio; torch tensors are accepted where noted but torch itself is never
imported. Every writer goes through :func:`atomic_path`, so a failed write never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal, TypeAlias

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
VIDEO_SUFFIXES = {".mp4"}
DEFAULT_MAX_AREA = 720 * 1280
CONTACT_SHEET_MAX_WIDTH = 2048

_PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {"PNG": {}, "JPEG": {"quality": 95}, "WEBP": {"quality": 95}}

Frames: TypeAlias = "Sequence[Image.Image] | np.ndarray | Any"  # Any: a torch.Tensor (F, 3, H, W)


# ----------------------------------------------------------------------------------------------------------- reading
def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file fully and return it as RGB (EXIF rotation applied, alpha composited on white).

    Raises FileNotFoundError when ``path`` does not exist and ValueError when it is a directory, unreadable,
    truncated, corrupt or not an image.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input image not found: {path}")
    if path.is_dir():
        raise ValueError(f"cannot read image {path}: it is a directory")
    try:
        with Image.open(path) as image:
            image.load()  # force a full decode so truncated files fail here, not later
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except Image.UnidentifiedImageError as exc:
        raise ValueError(f"cannot read image {path}: not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {str(exc) or type(exc).__name__}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: transparency is composited on white, 16/32-bit grey is scaled to 8 bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _wide_grey_to_l(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _wide_grey_to_l(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer grey → 8-bit (scaled by the 16-bit range); float grey assumed in [0, 1]."""
    array = np.asarray(image, dtype=np.float64)
    scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
    return Image.fromarray(np.clip(np.rint(array * scale), 0, 255).astype(np.uint8), mode="L")


_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as :func:`load_image` will see it (EXIF rotation applied), from the header only.

    FileNotFoundError / ValueError with a short reason when the file is missing or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError("not found" if not path.exists() else "not a file")
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError("not a readable image" + (f" ({exc})" if isinstance(exc, Image.DecompressionBombError)
                                                   else "")) from exc  # fmt: skip
    return (height, width) if orientation in _ROTATED else (width, height)


# ------------------------------------------------------------------------------------------------------------ sizing
def auto_size(width: int, height: int, max_area: int = DEFAULT_MAX_AREA, multiple: int = 16) -> tuple[int, int]:
    """NVIDIA's sizing recipe: keep the aspect ratio at ``max_area`` pixels, snap down to ``multiple``.

    ``ar = H / W; h = round(sqrt(A * ar)) // m * m; w = round(sqrt(A / ar)) // m * m``; never below ``multiple``, and
    for extreme aspect ratios the long side is capped so that the area stays within ``max_area``. Returns
    ``(width, height)``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max_area <= 0 or multiple <= 0:
        raise ValueError(f"max_area and multiple must be positive, got {max_area} and {multiple}")
    aspect = height / width
    new_height = max(multiple, round(math.sqrt(max_area * aspect)) // multiple * multiple)
    new_width = max(multiple, round(math.sqrt(max_area / aspect)) // multiple * multiple)
    # A side raised to the minimum must not leave the other at a size that blows the area (a 10000x1 image).
    longest = max(multiple, max_area // multiple // multiple * multiple)
    return min(new_width, longest), min(new_height, longest)


def check_size(width: int, height: int, multiple: int = 16, minimum: int = 16) -> None:
    """Raise ValueError unless both sides are multiples of ``multiple`` and at least ``minimum``."""
    bad = [
        f"{name} {value}"
        for name, value in (("height", height), ("width", width))
        if not isinstance(value, int) or value < minimum or value % multiple
    ]
    if bad:
        raise ValueError(
            f"height and width must be multiples of {multiple} and at least {minimum}, "
            f"got {height}x{width} (height x width): bad {' and '.join(bad)}"
        )


def resize_for_edit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to exactly ``(width, height)`` with bicubic, as NVIDIA's script does (PIL's ``resize`` default)."""
    image = to_rgb(image)
    if image.size == (width, height):
        return image.copy()
    return image.resize((width, height), resample=Image.Resampling.BICUBIC)


# ------------------------------------------------------------------------------------------------- output checks
def output_kind(path: str | os.PathLike) -> Literal["image", "video"]:
    """``"image"`` or ``"video"`` by suffix; ValueError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    shown = suffix or "(none)"
    raise ValueError(f"unknown output suffix '{shown}' for {path}: use .png, .jpg, .jpeg, .webp or .mp4")


def check_writable(path: str | os.PathLike) -> None:
    """Make sure ``path`` can be written: its folder exists (it is created if needed) and accepts new files.

    Raises ValueError("cannot write output PATH: <reason>") otherwise. Call this before any expensive work.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write output {path}: it is a directory")
    parent = path.parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"cannot write output {path}: {blocker} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ValueError(f"cannot write output {path}: {reason}") from exc


def check_finite(values: Any, what: str = "output") -> None:
    """Raise ValueError when a numpy array or torch tensor holds NaN or Inf."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch
        finite = bool(values.detach().isfinite().all())
    else:
        array = np.asarray(values)
        finite = not np.issubdtype(array.dtype, np.inexact) or bool(np.isfinite(array).all())
    if not finite:
        raise ValueError(f"non-finite values (NaN/Inf) in the {what}; nothing was written")


# ------------------------------------------------------------------------------------------------------ conversions
def frames_to_pil(frames: Frames) -> list[Image.Image]:
    """Frames as RGB PIL images, from a list of PIL images, a numpy array (F, H, W, 3) float in [0, 1] or uint8,
    a single (H, W, 3) array, a list of (H, W, 3) arrays, or a torch tensor (F, 3, H, W) in [0, 1]."""
    if isinstance(frames, Image.Image):
        return [to_rgb(frames)]
    if isinstance(frames, (list, tuple)) and all(isinstance(f, Image.Image) for f in frames):
        return [to_rgb(f) for f in frames]
    return [Image.fromarray(f) for f in _frames_to_uint8(frames)]


def _frames_to_uint8(frames: Frames) -> np.ndarray:
    """(F, H, W, 3) uint8 from any accepted frame container."""
    if isinstance(frames, (list, tuple)):
        if all(isinstance(f, Image.Image) for f in frames):
            return np.stack([np.asarray(to_rgb(f)) for f in frames])
        frames = np.stack([_to_numpy_hwc(f) for f in frames])
    elif hasattr(frames, "detach"):  # torch (F, 3, H, W) or (3, H, W)
        array = frames.detach().float().cpu().numpy()
        frames = np.moveaxis(array, -3, -1)
    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected frames shaped (F, H, W, 3), got {array.shape}")
    if array.shape[0] == 0:
        raise ValueError("no frames to write")
    array = array[..., :3] if array.shape[-1] != 1 else np.repeat(array, 3, axis=-1)
    if array.dtype == np.uint8:
        return array
    check_finite(array)
    return np.clip(np.rint(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def _to_numpy_hwc(frame: Any) -> np.ndarray:
    if isinstance(frame, Image.Image):
        return np.asarray(to_rgb(frame))
    if hasattr(frame, "detach"):
        return np.moveaxis(frame.detach().float().cpu().numpy(), -3, -1)
    return np.asarray(frame)


# ---------------------------------------------------------------------------------------------------------- writing
def chronoedit_home() -> Path:
    """Where chronoedit keeps its own files (the demo model, remembered weight digests): ``$CHRONOEDIT_HOME``, else
    ``~/.cache/chronoedit``."""
    home = os.environ.get("CHRONOEDIT_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "chronoedit"


_TEMP_NAME = re.compile(r"(?P<name>.+)\.tmp-\d+-[0-9a-f]{8}(?P<suffix>\.[^./]*)?")
_PROBE_NAME = re.compile(r"\..+\.probe-\d+-[0-9a-f]{8}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is exactly what :func:`atomic_path` or the writability probe call their temporary files."""
    if _PROBE_NAME.fullmatch(name):
        return True
    match = _TEMP_NAME.fullmatch(name)
    return bool(match) and match["name"].endswith(match["suffix"] or "")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix); on success move it onto ``path`` with ``os.replace``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def save_text(text: str, path: str | os.PathLike) -> Path:
    """Write a UTF-8 text file atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def hold_lock(path: str | os.PathLike, busy: str) -> IO[str]:
    """Take an exclusive lock on the file ``path`` (created if needed) and return its open handle: the lock lasts
    until the handle is closed or the process ends (the OS releases it even on SIGKILL). ValueError(``busy``) when
    another process holds it. Where ``fcntl`` is missing (not POSIX) nothing is locked."""
    handle = open(path, "a")  # noqa: SIM115 - the open handle is the lock
    try:
        import fcntl
    except ImportError:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ValueError(busy) from None
    return handle


@contextlib.contextmanager
def locked(path: str | os.PathLike, busy: str) -> Iterator[None]:
    """:func:`hold_lock` for the duration of a ``with`` block."""
    handle = hold_lock(path, busy)
    try:
        yield
    finally:
        handle.close()


def save_image(image: Image.Image | np.ndarray, path: str | os.PathLike) -> Path:
    """Write one image atomically; the format follows the suffix (.png, .jpg/.jpeg, .webp)."""
    path = Path(path)
    if output_kind(path) != "image":
        raise ValueError(f"cannot write an image to {path}: use .png, .jpg, .jpeg or .webp")
    image = image if isinstance(image, Image.Image) else frames_to_pil(image)[0]
    fmt = _PIL_FORMATS[path.suffix.lower()]
    with atomic_path(path) as tmp:
        to_rgb(image).save(tmp, format=fmt, **_SAVE_OPTIONS[fmt])
    return path


def save_video(frames: Frames, path: str | os.PathLike, fps: int = 8) -> Path:
    """Write frames as an H.264 (yuv420p) mp4 atomically. Odd sizes are padded by one edge pixel to even."""
    path = Path(path)
    if output_kind(path) != "video":
        raise ValueError(f"cannot write a video to {path}: use .mp4")
    array = _pad_to_even(_frames_to_uint8(frames))
    with atomic_path(path) as tmp:
        _encode_mp4(array, tmp, fps)
    return path


def _pad_to_even(array: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: replicate the last row/column where needed."""
    pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
    if not (pad_h or pad_w):
        return array
    return np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _encode_mp4(array: np.ndarray, path: Path, fps: int) -> None:
    """Encode (F, H, W, 3) uint8 with even H, W to ``path`` via imageio's ffmpeg plugin."""
    import imageio.v2 as imageio

    writer = imageio.get_writer(
        path,
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        quality=8,
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    with writer:
        for frame in array:
            writer.append_data(np.ascontiguousarray(frame))


def save_contact_sheet(
    frames: Frames,
    path: str | os.PathLike,
    columns: int | None = None,
    label: bool = True,
    max_width: int = CONTACT_SHEET_MAX_WIDTH,
) -> Path:
    """Write all frames as one grid image (frame index in the top-left corner of each tile), atomically.

    ``columns`` defaults to ceil(sqrt(F)); tiles are downscaled so the sheet is at most ``max_width`` wide.
    """
    images = frames_to_pil(frames)
    save_image(make_contact_sheet(images, columns=columns, label=label, max_width=max_width), path)
    return Path(path)


def make_contact_sheet(
    images: Sequence[Image.Image],
    columns: int | None = None,
    label: bool = True,
    max_width: int = CONTACT_SHEET_MAX_WIDTH,
    gap: int = 2,
) -> Image.Image:
    """Build the contact-sheet image for :func:`save_contact_sheet`."""
    if not images:
        raise ValueError("no frames for the contact sheet")
    count = len(images)
    columns = max(1, min(count, columns or math.ceil(math.sqrt(count))))
    rows = math.ceil(count / columns)
    width, height = images[0].size
    tile_w = max(1, min(width, (max_width - gap * (columns + 1)) // columns))
    tile_h = max(1, round(height * tile_w / width))
    sheet = Image.new("RGB", (columns * tile_w + gap * (columns + 1), rows * tile_h + gap * (rows + 1)), (32, 32, 32))
    font = _label_font(tile_h) if label else None
    for index, image in enumerate(images):
        tile = image if image.size == (tile_w, tile_h) else image.resize((tile_w, tile_h), Image.Resampling.LANCZOS)
        x = gap + (index % columns) * (tile_w + gap)
        y = gap + (index // columns) * (tile_h + gap)
        sheet.paste(tile, (x, y))
        if font is not None:
            _draw_label(ImageDraw.Draw(sheet), (x, y), str(index), font)
    return sheet


def _label_font(tile_height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(8, min(24, tile_height // 10))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _draw_label(draw: ImageDraw.ImageDraw, origin: tuple[int, int], text: str, font: Any) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x, y = origin
    draw.rectangle((x, y, x + right - left + 4, y + bottom - top + 4), fill=(0, 0, 0))
    draw.text((x + 2 - left, y + 2 - top), text, fill=(255, 255, 255), font=font)
