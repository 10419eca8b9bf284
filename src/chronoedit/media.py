"""Images and videos in and out: reading input images, frame conversions, and the image, video and contact-sheet
writers (each atomic, through :func:`chronoedit.files.atomic_path`).

Everything here is plain PIL / numpy / imageio; torch tensors are accepted where noted but torch itself is never
imported.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import UserError, one_line
from .files import atomic_path, open_regular

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
VIDEO_SUFFIXES = {".mp4"}
OUTPUT_FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}  # image format name -> suffix
CONTACT_SHEET_MAX_WIDTH = 2048
# The only image formats chronoedit decodes, from files and uploads alike: no EPS/PDF (Ghostscript), no ICO/ICNS/
# PSD/... decoders that a hostile file could reach.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

_PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {"PNG": {}, "JPEG": {"quality": 95}, "WEBP": {"quality": 95}}

Frames: TypeAlias = "Sequence[Image.Image] | np.ndarray | Any"  # Any: a torch.Tensor (F, 3, H, W)


# ----------------------------------------------------------------------------------------------------------- reading
def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file fully and return it as RGB (EXIF rotation applied, alpha composited on white).

    Only regular files in :data:`INPUT_FORMATS` are read. Raises UserError when ``path`` does not exist, is not a
    regular file (a folder, a named pipe), is unreadable, truncated, corrupt or not an image in those formats.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"input image not found: {path}")
    try:
        with open_regular(path, "image") as handle, Image.open(handle, formats=INPUT_FORMATS) as image:
            image.load()  # force a full decode so truncated files fail here, not later
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except Image.UnidentifiedImageError as exc:
        raise UserError(f"cannot read image {path}: not {_format_names()}") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"cannot read image {path}: {one_line(exc)}") from exc


def _format_names() -> str:
    """The accepted formats in words: ``a PNG, JPEG, ... or TIFF image``."""
    return f"a {', '.join(INPUT_FORMATS[:-1])} or {INPUT_FORMATS[-1]} image"


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
        with open_regular(path, "image") as handle, Image.open(handle, formats=INPUT_FORMATS) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112)
    except Image.DecompressionBombError as exc:
        raise UserError(f"not a readable image ({one_line(exc)})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError("not a readable image") from exc
    return (height, width) if orientation in _ROTATED else (width, height)


# ------------------------------------------------------------------------------------------------- output checks
def output_kind(path: str | os.PathLike) -> Literal["image", "video"]:
    """``"image"`` or ``"video"`` by suffix; UserError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    shown = suffix or "(none)"
    raise UserError(f"unknown output suffix '{shown}' for {path}: use .png, .jpg, .jpeg, .webp or .mp4")



def check_finite(values: Any, what: str = "output") -> None:
    """Raise UserError when a numpy array or torch tensor holds NaN or Inf."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch
        finite = bool(values.detach().isfinite().all())
    else:
        array = np.asarray(values)
        finite = not np.issubdtype(array.dtype, np.inexact) or bool(np.isfinite(array).all())
    if not finite:
        raise UserError(f"non-finite values (NaN/Inf) in the {what}; nothing was written")


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



def save_image(image: Image.Image | np.ndarray, path: str | os.PathLike) -> Path:
    """Write one image atomically; the format follows the suffix (.png, .jpg/.jpeg, .webp)."""
    path = Path(path)
    if output_kind(path) != "image":
        raise UserError(f"cannot write an image to {path}: use .png, .jpg, .jpeg or .webp")
    image = image if isinstance(image, Image.Image) else frames_to_pil(image)[0]
    fmt = _PIL_FORMATS[path.suffix.lower()]
    with atomic_path(path) as tmp:
        to_rgb(image).save(tmp, format=fmt, **_SAVE_OPTIONS[fmt])
    return path


def save_video(frames: Frames, path: str | os.PathLike, fps: int = 8) -> Path:
    """Write frames as an H.264 (yuv420p) mp4 atomically. Odd sizes are padded by one edge pixel to even."""
    path = Path(path)
    if output_kind(path) != "video":
        raise UserError(f"cannot write a video to {path}: use .mp4")
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
    """Encode (F, H, W, 3) uint8 with even H, W to ``path`` with ffmpeg (libx264, yuv420p), then read it back.

    ffmpeg runs as a child whose exit status is checked (a full disk, a killed encoder) and the file is re-opened
    and its frames counted: an OSError naming the cause when the video is not whole, so nothing short is kept.
    """
    import subprocess

    frames, height, width, _ = array.shape
    command = [
        _ffmpeg(), "-nostdin", "-y", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
        "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "10", "-f", "mp4", str(path),
    ]  # fmt: skip
    done = subprocess.run(command, input=np.ascontiguousarray(array).tobytes(), capture_output=True, check=False)
    if done.returncode != 0:
        raise _encoder_error(done.returncode, done.stderr.decode("utf-8", "replace"), path)
    written = _count_frames(path)
    if written != frames:
        raise OSError(errno.EIO, f"the video reads back with {written} of its {frames} frames")


def _ffmpeg() -> str:
    """The ffmpeg executable imageio-ffmpeg ships (or the one it finds on the system)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _encoder_error(returncode: int, stderr: str, path: Path) -> OSError:
    """An OSError for a failed ffmpeg run: ENOSPC when it ran out of space, else its last message."""
    if "No space left on device" in stderr:
        return OSError(errno.ENOSPC, "the disk is full")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"failed (exit status {returncode})"
    return OSError(errno.EIO, f"the video encoder {how}" + (f": {lines[-1]}" if lines else ""))


def _count_frames(path: Path) -> int:
    """How many frames ``path`` decodes to (0 when it does not open as a video)."""
    import imageio_ffmpeg

    try:
        return imageio_ffmpeg.count_frames_and_secs(str(path))[0]
    except (RuntimeError, OSError):
        return 0


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
