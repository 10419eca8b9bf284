"""The dataset folder the labeler writes, safe to kill at any moment and to resume.

Layout (paths in the CSVs are relative to the dataset folder, as NVIDIA's / DiffSynth's loaders expect)::

    DATASET/metadata.csv          key,video,prompt,source_image,target_image   one row per labelled pair
    DATASET/skipped.csv           key,source,target,reason                     filtered ("no change") or bad pairs
    DATASET/videos/KEY.mp4        the pair as a 2-frame video [source, target]
    DATASET/images/KEY_source.png, KEY_target.png

A pair's files are written atomically first, then its CSV row is appended, flushed and fsynced, so a crash loses at
most the pair in flight. On open, a torn last row (a write cut short) is dropped and temp files of interrupted
writes are removed; keys already in either CSV are done. Rows are found as the csv module reads them, so a newline
inside a quoted cell (a prompt edited by hand over several lines) ends no row and no quote is ever left open. A last
row that is whole but lacks its final newline (a hand-edited file saved by an editor that drops it) is kept and the
newline added: whole means every cell present, quotes closed, and its last cell complete (metadata.csv: the target
image it names exists). A skipped.csv row without its newline is always taken as torn: its pair is simply asked
again. Whatever a repair cuts is kept in ``NAME.torn`` beside the CSV.
One labeler per folder at a time (an flock).
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from PIL import Image

from .. import files, media
from ..errors import UserError
from .pairs import Pair

METADATA_COLUMNS = ("key", "video", "prompt", "source_image", "target_image")
SKIPPED_COLUMNS = ("key", "source", "target", "reason")
LOCK_NAME = ".chronoedit-label.lock"
VIDEO_FPS = 8
TORN_SUFFIX = ".torn"  # where a repair keeps the bytes of a torn last record
RowCheck = Callable[[dict[str, str], str], bool]  # whether a last row (its cells, its text) has its last cell complete


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
        with files.writing(self.root / names["source"]):
            media.save_image(source, self.root / names["source"])
        with files.writing(self.root / names["target"]):
            media.save_image(target, self.root / names["target"])
        with files.writing(self.root / video):
            media.save_video([source, target], self.root / video, fps=VIDEO_FPS)
        with files.writing(self.root / "metadata.csv"):
            _append(self._metadata, (pair.key, video, prompt, names["source"], names["target"]))
        self.done.add(pair.key)

    def skip(self, pair: Pair, reason: str) -> None:
        """Record a pair that gets no metadata row (no change, bad data, unusable answer), fsynced."""
        reason = " ".join(reason.split())
        with files.writing(self.root / "skipped.csv"):
            _append(self._skipped, (pair.key, str(pair.source), str(pair.target), reason))
        self.skips[pair.key] = reason


@contextlib.contextmanager
def open_dataset(root: str | Path, retry_skipped: bool = False) -> Iterator[LabelDataset]:
    """Create or reopen the dataset folder (locked while open); ``retry_skipped`` forgets skipped.csv's rows.

    UserError when the folder is no label dataset, is in use, or cannot be written (no permission, a full disk)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is not a directory", "out")
    with contextlib.ExitStack() as stack:
        with files.writing(root):
            for folder in (root, root / "images", root / "videos"):
                folder.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_lock(root))
            for folder in (root, root / "images", root / "videos"):
                _remove_temp_files(folder)
            done = {row["key"] for row in _repair_csv(root / "metadata.csv", METADATA_COLUMNS, _metadata_row_ok(root))}
            skipped_path = root / "skipped.csv"
            if retry_skipped and skipped_path.exists():
                with files.atomic_path(skipped_path) as tmp:
                    tmp.write_text(_line(SKIPPED_COLUMNS), encoding="utf-8")
            skips = {row["key"]: row["reason"] for row in _repair_csv(skipped_path, SKIPPED_COLUMNS, _skipped_row_ok)}
            metadata = stack.enter_context(open(root / "metadata.csv", "a", encoding="utf-8", newline=""))
            skipped = stack.enter_context(open(skipped_path, "a", encoding="utf-8", newline=""))
        yield LabelDataset(root, metadata, skipped, done, skips)


def read_metadata(root: str | Path) -> list[dict[str, str]]:
    """The rows of ``root/metadata.csv`` (for tools and tests); a torn last line is ignored, not repaired."""
    data = (Path(root) / "metadata.csv").read_bytes()
    complete = _whole_lines(data, METADATA_COLUMNS, _metadata_row_ok(Path(root)))
    return list(csv.DictReader(io.StringIO(complete.decode("utf-8"), newline="")))


def _line(values: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def _append(handle: IO[str], values: tuple[str, ...]) -> None:
    """Append one CSV line and make it durable before returning."""
    handle.write(_line(values))
    handle.flush()
    os.fsync(handle.fileno())


def _repair_csv(path: Path, columns: tuple[str, ...], row_ok: RowCheck) -> list[dict[str, str]]:
    """Create ``path`` with its header, or drop a torn last record into ``PATH.torn`` (or end a whole one with its
    newline); return its rows. UserError for foreign columns or a file that is not UTF-8 text."""
    data = path.read_bytes() if path.exists() else b""
    try:
        complete = _whole_lines(data, columns, row_ok)
    except UnicodeDecodeError as exc:  # left as it is: a foreign or hand-edited file
        raise UserError(f"{path} is not UTF-8 text ({exc}): is --out a chronoedit label dataset?") from exc
    if not complete:
        with files.atomic_path(path) as tmp:
            tmp.write_text(_line(columns), encoding="utf-8")
        return []
    reader = csv.DictReader(io.StringIO(complete.decode("utf-8"), newline=""))
    if tuple(reader.fieldnames or ()) != columns:  # checked first: a foreign file is left as it is
        raise UserError(
            f"{path} has the columns {','.join(reader.fieldnames or ())}, expected {','.join(columns)}: "
            "is --out a chronoedit label dataset?"
        )
    if len(complete) > len(data):  # a whole last row without its newline
        with open(path, "ab") as handle:
            handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
    elif complete != data:  # the cut bytes are kept beside it: a hand-edit's stray quote must not lose rows for good
        with open(path.with_name(path.name + TORN_SUFFIX), "ab") as kept:
            kept.write(data[len(complete):] + b"\n")
            kept.flush()
            os.fsync(kept.fileno())
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
            os.fsync(handle.fileno())
    return list(reader)


def _whole_lines(data: bytes, columns: tuple[str, ...], row_ok: RowCheck) -> bytes:
    """``data`` up to the end of its last complete CSV record; a last record that lacks only its final newline is
    kept with the newline added when it is a whole row. Only an incomplete last record is cut, at its start."""
    start, closed = _last_record(data)
    tail = data[start:]
    if not tail or (closed and tail.endswith((b"\n", b"\r"))):
        return data
    if closed and _whole_row(tail, columns, row_ok if start else None):  # at the very start: the header
        return data + b"\n"
    return data[:start]


def _last_record(data: bytes) -> tuple[int, bool]:
    """Where the last CSV record of ``data`` starts (a byte offset) and whether it ends outside quotes.

    The csv module itself finds the records, as the readers later see them: a newline inside a quoted cell ends no
    record. It is fed one physical line at a time (split as ``newline=""`` splits them), so ``line_num`` after each
    record tells where the next one starts; a sentinel line after the data is swallowed only by a record whose
    quotes are still open at the end of the data. A non-UTF-8 byte in the data raises UnicodeDecodeError, unless it
    is in an unfinished last line (a write cut inside a character): that line's record is incomplete.
    """
    lines = data.splitlines(keepends=True)
    texts = [line.decode("utf-8") for line in lines[:-1]]
    torn_character = False
    if lines:
        try:
            texts.append(lines[-1].decode("utf-8"))
        except UnicodeDecodeError:
            if lines[-1].endswith((b"\n", b"\r")):
                raise
            texts.append(lines[-1].decode("utf-8", errors="replace"))
            torn_character = True
    offsets = list(itertools.accumulate(map(len, lines), initial=0))
    reader = csv.reader([*texts, "\n"])
    last = start = 0  # the line index where the last record and the next one start
    for _ in reader:
        if start == len(lines):  # the sentinel on its own
            break
        if reader.line_num > len(lines):  # the sentinel swallowed into an open quoted cell
            return offsets[start], False
        last, start = start, reader.line_num
    return offsets[last], not torn_character


def _whole_row(record: bytes, columns: tuple[str, ...], row_ok: RowCheck | None) -> bool:
    """Whether ``record`` parses as one row with every column (quotes closed) that ``row_ok`` accepts."""
    try:
        text = record.decode("utf-8")
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except (UnicodeDecodeError, csv.Error):
        return False
    if len(rows) != 1 or len(rows[0]) != len(columns):
        return False
    return row_ok is None or row_ok(dict(zip(columns, rows[0], strict=True)), text)


def _metadata_row_ok(root: Path) -> RowCheck:
    """A metadata row's last cell is complete when the target image it names exists (it is written first)."""
    return lambda row, _text: bool(row["target_image"]) and (root / row["target_image"]).is_file()


def _skipped_row_ok(row: dict[str, str], text: str) -> bool:
    """Never: a skipped row without its final newline is taken as torn. Its reason may be cut anywhere, even after a
    closing quote (a cut inside ``""yes""`` ends in a quote too), so the pair is simply asked about again: cheap,
    and the answer is recorded anew."""
    return False


def _remove_temp_files(folder: Path) -> None:
    """Temp files of atomic writes cut short by a crash (exactly :func:`chronoedit.io.atomic_path`'s names)."""
    for path in folder.iterdir():
        if path.is_file() and files.is_temp_name(path.name):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _lock(root: Path) -> contextlib.AbstractContextManager[None]:
    """One labeler per dataset folder (an flock the OS releases even on SIGKILL)."""
    return files.locked(root / LOCK_NAME, f"another chronoedit label is writing to {root}")


