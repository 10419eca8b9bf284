"""Training data: a CSV of edit pairs and reasoning videos, read, checked and sized, each error naming its row.

Accepted layouts (paths relative to the CSV's folder; extra columns are ignored):

- ``key,video,prompt,source_image,target_image`` (``chronoedit label``'s ``metadata.csv``): the two images when both
  are given, else the video;
- ``key,video,prompt`` (NVIDIA / DiffSynth): a 2-frame video is a pair; a 4k+1-frame video (>= 9, e.g. 29) is a
  reasoning video: source, in-between frames, target;
- ``source,target,prompt`` (or ``source_image,target_image,prompt``), ``key`` optional.

A pair trains as the 5-frame clip [source, target x 4] (2 latent frames, the target fills the last one, as NVIDIA
trained); a reasoning video as itself (29 frames -> 8 latent frames). Every sample is sized to the training size:
resized to cover it and center-cropped (aspect kept). A pair whose source and target differ in size is an error: the
edit must be pixel-aligned with its input, and a silent resize would teach the model to move the content.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .. import files, media, sizing
from ..errors import UserError
from ..files import os_reason as reason

METADATA_NAME = "metadata.csv"
PAIR_FRAMES = 5  # [source, target x 4]
MIN_VIDEO_FRAMES = 9  # 3 latent frames: at least one in-between latent frame
VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif"}


@dataclass(frozen=True)
class SampleSpec:
    """One CSV row: a pair (``source`` + ``target``) or a video."""

    key: str
    line: int  # line of the CSV file (the header is line 1)
    prompt: str
    source: Path | None = None
    target: Path | None = None
    video: Path | None = None

    @property
    def where(self) -> str:
        return f"row {self.line} (key {self.key!r})"


def dataset_csv(path: str | Path) -> Path:
    """The CSV itself, or ``metadata.csv`` in a dataset folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / METADATA_NAME
    if not path.is_file():
        raise UserError(f"dataset not found: {path} (a folder with {METADATA_NAME}, or a CSV file)", "dataset")
    return path


def read_dataset(path: str | Path) -> list[SampleSpec]:
    """Rows of the dataset CSV as :class:`SampleSpec`; UserError naming the CSV row of the first bad one."""
    file = dataset_csv(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise UserError(f"cannot read dataset {file}: {reason(err, file)}", "dataset") from err
    except UnicodeDecodeError as err:
        raise UserError(f"cannot read dataset {file}: not UTF-8 text ({err})", "dataset") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    specs = []
    try:
        columns = {c.strip() for c in reader.fieldnames or [] if c}
        _check_columns(file, columns)
        for row in reader:
            if any(isinstance(v, str) and v.strip() for v in row.values()):  # blank lines are skipped
                specs.append(_row_spec(file, reader.line_num, row))
    except csv.Error as err:
        raise UserError(f"{file} line {reader.line_num}: cannot parse: {err}", "dataset") from None
    if not specs:
        raise UserError(f"dataset {file} has no rows (an empty CSV)", "dataset")
    first: dict[str, SampleSpec] = {}
    for spec in specs:
        earlier = first.setdefault(spec.key, spec)
        if earlier is not spec:
            raise UserError(f"{file} {spec.where}: key {spec.key!r} appears more than once (also row {earlier.line})",
                            "dataset")  # fmt: skip
    return specs


def _check_columns(file: Path, columns: set[str]) -> None:
    if not columns:
        raise UserError(f"dataset {file} is empty (no header row)", "dataset")
    if "prompt" not in columns:
        raise UserError(f"dataset {file} has no 'prompt' column (columns: {sorted(columns)})", "dataset")
    pair = {"source", "target"} <= columns or {"source_image", "target_image"} <= columns
    if not pair and "video" not in columns:
        raise UserError(
            f"dataset {file}: need 'video' or 'source'/'target' (or 'source_image'/'target_image') columns, "
            f"got {sorted(columns)}",
            "dataset",
        )


def _row_spec(file: Path, line: int, row: dict[str, str | None]) -> SampleSpec:
    """One row -> its spec; files are checked to exist (read later, by :func:`load_frames`)."""
    value = {k.strip(): v.strip() for k, v in row.items() if k and isinstance(v, str)}
    key = value.get("key") or f"row{line}"
    where = f"{file} row {line} (key {key!r})"
    prompt = value.get("prompt", "")
    if not prompt:
        raise UserError(f"{where}: empty prompt", "dataset")
    source = value.get("source_image") or value.get("source")
    target = value.get("target_image") or value.get("target")
    video = value.get("video")
    root = file.parent
    if source and target:
        paths = {"source": root / source, "target": root / target}
    elif video:
        paths = {"video": root / video}
    else:
        raise UserError(f"{where}: give both source and target images, or a video", "dataset")
    for column, path in paths.items():
        if not path.is_file():
            raise UserError(f"{where}: {column} file not found: {path}", "dataset")
    return SampleSpec(key=key, line=line, prompt=prompt, **paths)


# --------------------------------------------------------------------------------------------------------- frames
def load_frames(spec: SampleSpec) -> list[Image.Image]:
    """The sample's frames as RGB images: [source, target] for a pair (also a 2-frame video), every frame of a
    reasoning video. UserError naming the row for an unreadable file, mismatched sizes or a bad frame count."""
    try:
        frames = [media.load_image(spec.source), media.load_image(spec.target)] if spec.video is None else _video(spec)
    except (OSError, ValueError) as err:
        raise UserError(f"{spec.where}: {err}", "dataset") from None
    if len(frames) != 2 and (len(frames) < MIN_VIDEO_FRAMES or (len(frames) - 1) % 4):
        raise UserError(
            f"{spec.where}: video {spec.video} has {len(frames)} frames; use 2 (an edit pair) or 4k+1 >= "
            f"{MIN_VIDEO_FRAMES} (a reasoning video, e.g. 29)",
            "dataset",
        )
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        what = f"source {frames[0].size[0]}x{frames[0].size[1]} and target {frames[-1].size[0]}x{frames[-1].size[1]}"
        raise UserError(f"{spec.where}: {what} differ in size (the pair must be pixel-aligned; resize both alike)",
                        "dataset")  # fmt: skip
    return frames


def _video(spec: SampleSpec) -> list[Image.Image]:
    """Every frame of the row's video (imageio / ffmpeg)."""
    import imageio.v3 as iio

    files.check_regular(spec.video, "video")  # a named pipe would block ffmpeg
    try:
        array = iio.imread(spec.video, index=None)  # [F, H, W, 3]
    except Exception as err:  # imageio raises many types for a corrupt or unknown file
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read video {spec.video}: {why}", "dataset") from None
    if array.ndim == 3:  # a single image
        array = array[None]
    return [media.to_rgb(Image.fromarray(frame)) for frame in array]


def training_size(size: tuple[int, int], height: int | None, width: int | None, max_area: int) -> tuple[int, int]:
    """(width, height) to train a sample of ``size`` at: the given size, else its aspect ratio at ``max_area``."""
    if height is not None and width is not None:
        return width, height
    return sizing.auto_size(*size, max_area=max_area)


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover ``width`` x ``height`` (bicubic, aspect kept), then center-crop to it."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.Resampling.BICUBIC
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def clip_frames(frames: list[Image.Image]) -> list[Image.Image]:
    """The clip the VAE encodes: a pair becomes [source, target x 4] (5 frames); a video stays as it is."""
    return [frames[0], *[frames[1]] * (PAIR_FRAMES - 1)] if len(frames) == 2 else frames


def prepared_frames(spec: SampleSpec, height: int | None, width: int | None, max_area: int) -> list[Image.Image]:
    """The row's frames read, checked and fitted to the training size."""
    frames = load_frames(spec)
    w, h = training_size(frames[0].size, height, width, max_area)
    return [fit(f, w, h) for f in frames]


def check_dataset(specs: list[SampleSpec]) -> None:
    """Quick pass before any model loads: every image's header is readable and each pair's sizes match as the
    images are loaded, EXIF rotation applied (videos are decoded later, when cached)."""
    for spec in specs:
        if spec.video is not None:
            continue
        sizes = []
        for column, path in (("source", spec.source), ("target", spec.target)):
            try:
                sizes.append(media.image_size(path))
            except (OSError, ValueError) as err:
                raise UserError(f"{spec.where}: cannot read {column} image {path}: {err}", "dataset") from None
        if sizes[0] != sizes[1]:
            raise UserError(
                f"{spec.where}: source {sizes[0][0]}x{sizes[0][1]} and target {sizes[1][0]}x{sizes[1][1]} differ in "
                "size (the pair must be pixel-aligned; resize both alike)",
                "dataset",
            )
