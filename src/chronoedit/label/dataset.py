"""The dataset folder the labeler writes, safe to kill at any moment and to resume.

Layout (paths in the CSVs are relative to the dataset folder, as NVIDIA's / DiffSynth's loaders expect)::

    DATASET/metadata.csv          key,video,prompt,source_image,target_image   one row per labelled pair
    DATASET/skipped.csv           key,source,target,reason                     filtered ("no change") or bad pairs
    DATASET/videos/KEY.mp4        the pair as a 2-frame video [source, target]
    DATASET/images/KEY_source.png, KEY_target.png

A pair's files are written atomically first, then its CSV row is appended, flushed and fsynced, so a crash loses at
most the pair in flight. On open, a torn last line (a write cut short) is dropped and temp files of interrupted
writes are removed; keys already in either CSV are done. One labeler per folder at a time (an flock).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from PIL import Image

from .. import io as cio
from .pairs import Pair

METADATA_COLUMNS = ("key", "video", "prompt", "source_image", "target_image")
SKIPPED_COLUMNS = ("key", "source", "target", "reason")
LOCK_NAME = ".chronoedit-label.lock"
VIDEO_FPS = 8


class LabelDataset:
    """An open dataset folder: what is done, and appenders for new rows. Use :func:`open_dataset`."""

    def __init__(self, root: Path, metadata: IO[str], skipped: IO[str], done: set[str], skips: dict[str, str]):
        self.root = root
        self._metadata = metadata
        self._skipped = skipped
        self.done = done  # keys in metadata.csv
        self.skips = skips  # key -> reason, from skipped.csv

    def has(self, key: str) -> bool:
        """Whether ``key`` is already labelled or recorded as skipped."""
        return key in self.done or key in self.skips

    def add(self, pair: Pair, source: Image.Image, target: Image.Image, prompt: str) -> None:
        """Write the pair's images and 2-frame video (atomically), then append and fsync its metadata row."""
        names = {role: f"images/{pair.key}_{role}.png" for role in ("source", "target")}
        video = f"videos/{pair.key}.mp4"
        cio.save_image(source, self.root / names["source"])
        cio.save_image(target, self.root / names["target"])
        cio.save_video([source, target], self.root / video, fps=VIDEO_FPS)
        _append(self._metadata, (pair.key, video, prompt, names["source"], names["target"]))
        self.done.add(pair.key)

    def skip(self, pair: Pair, reason: str) -> None:
        """Record a pair that gets no metadata row (no change, bad data, unusable answer), fsynced."""
        reason = " ".join(reason.split())
        _append(self._skipped, (pair.key, str(pair.source), str(pair.target), reason))
        self.skips[pair.key] = reason


@contextlib.contextmanager
def open_dataset(root: str | Path, retry_skipped: bool = False) -> Iterator[LabelDataset]:
    """Create or reopen the dataset folder (locked while open); ``retry_skipped`` forgets skipped.csv's rows."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root} is not a directory")
    for folder in (root, root / "images", root / "videos"):
        folder.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        for folder in (root, root / "images", root / "videos"):
            _remove_temp_files(folder)
        done = {row["key"] for row in _repair_csv(root / "metadata.csv", METADATA_COLUMNS)}
        skipped_path = root / "skipped.csv"
        if retry_skipped and skipped_path.exists():
            with cio.atomic_path(skipped_path) as tmp:
                tmp.write_text(_line(SKIPPED_COLUMNS), encoding="utf-8")
        skips = {row["key"]: row["reason"] for row in _repair_csv(skipped_path, SKIPPED_COLUMNS)}
        with open(root / "metadata.csv", "a", encoding="utf-8", newline="") as metadata, \
                open(skipped_path, "a", encoding="utf-8", newline="") as skipped:  # fmt: skip
            yield LabelDataset(root, metadata, skipped, done, skips)


def read_metadata(root: str | Path) -> list[dict[str, str]]:
    """The rows of ``root/metadata.csv`` (for tools and tests); a torn last line is ignored, not repaired."""
    text = (Path(root) / "metadata.csv").read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(complete, newline="")))


def _line(values: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def _append(handle: IO[str], values: tuple[str, ...]) -> None:
    """Append one CSV line and make it durable before returning."""
    handle.write(_line(values))
    handle.flush()
    os.fsync(handle.fileno())


def _repair_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Create ``path`` with its header, or drop a torn last line; return its rows. ValueError for foreign columns."""
    data = path.read_bytes() if path.exists() else b""
    complete = data[: data.rfind(b"\n") + 1]
    if not complete:
        with cio.atomic_path(path) as tmp:
            tmp.write_text(_line(columns), encoding="utf-8")
        return []
    if complete != data:
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
            os.fsync(handle.fileno())
    reader = csv.DictReader(io.StringIO(complete.decode("utf-8"), newline=""))
    if tuple(reader.fieldnames or ()) != columns:
        raise ValueError(
            f"{path} has the columns {','.join(reader.fieldnames or ())}, expected {','.join(columns)}: "
            "is --out a chronoedit label dataset?"
        )
    return list(reader)


def _remove_temp_files(folder: Path) -> None:
    """Temp files of atomic writes cut short by a crash (``NAME.tmp-PID-HEX.suffix``)."""
    for path in folder.iterdir():
        if path.is_file() and ".tmp-" in path.name:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _lock(root: Path) -> contextlib.AbstractContextManager[None]:
    """One labeler per dataset folder (an flock the OS releases even on SIGKILL)."""
    return cio.locked(root / LOCK_NAME, f"another chronoedit label is writing to {root}")
