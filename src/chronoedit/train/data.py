"""Training data: a CSV of edit pairs and reasoning videos, read, checked and sized, each error naming its row.

Accepted layouts (paths relative to the CSV's folder; extra columns are ignored):

- ``key,video,prompt,source_image,target_image`` (``chronoedit label``'s ``metadata.csv``): the two images when both
  are given, else the video;
- ``key,video,prompt`` (NVIDIA / DiffSynth): a 2-frame video is a pair; a 26-frame video (NVIDIA's: 25 trajectory
  frames, then the target) or a 29-frame one (the target last) is a reasoning video;
- ``source,target,prompt`` (or ``source_image,target_image,prompt``), ``key`` optional.

A pair trains as the 5-frame clip [source, target x 4] (2 latent frames, the target fills the last one, as NVIDIA
trained). A reasoning video trains as NVIDIA's full training builds it (``chronoedit/_src/models/
chronoedit_14b_edit_model.py``, ``get_data_and_condition``): 8 latent frames, the 7 of its first 25 frames (the
trajectory) followed by the last latent frame of its pair's clip [source, target x 4] (the edit latent, the same one
a pair trains and the pipeline decodes as the edit); other lengths are refused. Every sample is sized to the
training size: resized to cover it and center-cropped (aspect kept). A pair whose source and target differ in size
is an error: the edit must be pixel-aligned with its input, and a silent resize would teach the model to move the
content.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .. import files, media, sizing
from ..errors import UserError
from ..files import os_reason as reason

METADATA_NAME = "metadata.csv"
PAIR_FRAMES = 5  # [source, target x 4]
TRAJECTORY_FRAMES = 25  # a reasoning video's frames encoded as one clip (7 latent frames); the edit latent follows
REASONING_FRAMES = (26, 29)  # NVIDIA's reasoning videos (25 + the target); the pipeline's reasoning length
SIZE_MULTIPLE = 16  # training sizes are multiples of 16 (the VAE's 8 x the patch's 2)
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
    if len(frames) != 2 and len(frames) not in REASONING_FRAMES:
        raise UserError(
            f"{spec.where}: video {spec.video} has {len(frames)} frames; use 2 (an edit pair), 26 (a reasoning video "
            "as NVIDIA's: 25 trajectory frames, then the target) or 29 (the target last; frames 26-28 unused)",
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


def training_size(size: tuple[int, int], height: int | None, width: int | None, max_area: int,
                  buckets: bool = False) -> tuple[int, int]:  # fmt: skip
    """(width, height) to train a sample of ``size`` at: the given size; else, with ``buckets``, the bucket of
    :func:`bucket_sizes` nearest its aspect ratio, without, its own aspect ratio at ``max_area``. An image smaller
    than ``max_area`` keeps its size, cut down to multiples of 16 (never upscaled: NVIDIA's
    ``ImageCropAndResize.get_height_width``)."""
    if height is not None and width is not None:
        return width, height
    if size[0] * size[1] <= max_area:
        w, h = (max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE) for side in size)
        return w, h
    if buckets:
        aspect = math.log(size[0] / size[1])
        return min(bucket_sizes(max_area), key=lambda b: abs(math.log(b[0] / b[1]) - aspect))
    return sizing.auto_size(*size, max_area=max_area)


# Aspect ratios (width:height) of the buckets, from 1:2 to 2:1.
BUCKET_ASPECTS = ((1, 2), (9, 16), (2, 3), (3, 4), (4, 5), (1, 1), (5, 4), (4, 3), (3, 2), (16, 9), (2, 1))


def bucket_sizes(max_area: int) -> list[tuple[int, int]]:
    """The fixed (width, height) buckets at ``max_area``: each of :data:`BUCKET_ASPECTS` sized as inference sizes an
    image (:func:`chronoedit.sizing.auto_size`, multiples of 16); 720x1280's area gives 1280x720 for 16:9."""
    return sorted({sizing.auto_size(w, h, max_area=max_area) for w, h in BUCKET_ASPECTS})


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


def pair_clip(frames: list[Image.Image]) -> list[Image.Image]:
    """The edit clip of a pair or a reasoning video: [source, target x 4] (5 frames, 2 latent frames)."""
    return [frames[0], *[frames[-1]] * (PAIR_FRAMES - 1)]


def clips(frames: list[Image.Image]) -> list[list[Image.Image]]:
    """The clips the VAE encodes, each on its own: a pair's [source, target x 4]; a reasoning video's first 25 frames
    (7 latent frames) and its [source, target x 4] (of which the last latent frame, the edit latent, is kept)."""
    if len(frames) == 2:
        return [pair_clip(frames)]
    return [frames[:TRAJECTORY_FRAMES], pair_clip(frames)]


def prepared_frames(spec: SampleSpec, height: int | None, width: int | None, max_area: int,
                    buckets: bool = False) -> list[Image.Image]:  # fmt: skip
    """The row's frames read, checked and fitted to the training size."""
    frames = load_frames(spec)
    w, h = training_size(frames[0].size, height, width, max_area, buckets)
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
