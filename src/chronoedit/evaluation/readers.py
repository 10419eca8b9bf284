"""Read benchmarks from local files in their published layouts.

- **ImgEdit-Basic**: ``basic_edit.json`` (``{key: {"id": "animal/0001.jpg", "prompt": ..., "edit_type": ...}}``) with
  its image folder (``--images``; default the JSON's folder), the ``id`` relative to it.
- **GEdit-Bench**: its dataset files saved locally: the Parquet files of the hub dataset (columns ``key``,
  ``task_type``, ``instruction``, ``instruction_language``, ``input_image`` with the PNG bytes; needs ``pyarrow``), or
  a JSONL/JSON/CSV export with those columns and ``input_image`` a path relative to the file.
- **Generic** (PBench-Edit style and in-house sets): JSONL or CSV with ``id``, ``image``, ``prompt`` and optionally
  ``category`` and ``reference``; paths relative to the file.

Every problem is one :class:`BenchmarkError` line naming the file and the record, raised before any model loads.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import files
from ..errors import UserError
from ..records import csv_records, jsonl_records
from .items import FORMATS, GEDIT, GENERIC, ID_PATTERN, IMGEDIT, Benchmark, EvalItem

IMGEDIT_FILE = "basic_edit.json"
GEDIT_COLUMNS = ("key", "task_type", "instruction", "instruction_language")
GENERIC_COLUMNS = {"id", "image", "prompt", "category", "reference"}


class BenchmarkError(UserError):
    """A benchmark that cannot be read (one line naming the file and the record)."""


def read_benchmark(path: str | Path, fmt: str | None = None, images: Path | None = None,
                   extract_dir: Path | None = None) -> Benchmark:  # fmt: skip
    """The benchmark at ``path`` (a file, or a folder holding ``basic_edit.json`` or Parquet files), in format ``fmt``
    (default: detected). ``images`` is ImgEdit's image folder; ``extract_dir`` receives the input images embedded in
    GEdit's Parquet files. Every input image is checked to exist."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BenchmarkError(f"benchmark not found: {path}", "bench")
    if fmt is not None and fmt not in FORMATS:
        raise BenchmarkError(f"unknown benchmark {{format}} {fmt!r}: use one of {', '.join(FORMATS)}", "format")
    if path.is_dir():
        path = _file_in_folder(path)
    fmt = fmt or detect_format(path)
    if fmt == IMGEDIT:
        items = _imgedit_items(path, images or path.parent)
    elif fmt == GEDIT:
        items = _gedit_items(path, extract_dir)
    else:
        items = _generic_items(path)
    if not items:
        raise BenchmarkError(f"benchmark {path} has no items", "bench")
    _check_unique(items, path)
    _check_images(items, path)
    return Benchmark(fmt, path, tuple(items))


def _file_in_folder(folder: Path) -> Path:
    if (folder / IMGEDIT_FILE).is_file():
        return folder / IMGEDIT_FILE
    parquet = sorted(folder.rglob("*.parquet"))
    if parquet:
        return folder  # GEdit's Parquet shards, read together
    raise BenchmarkError(f"benchmark folder {folder} holds neither {IMGEDIT_FILE} nor Parquet files", "bench")


def detect_format(path: Path) -> str:
    """ImgEdit for a JSON object of objects with ``edit_type``; GEdit for Parquet or records with GEdit's columns;
    generic otherwise."""
    if path.is_dir() or path.suffix.lower() == ".parquet":
        return GEDIT
    records = _records(path)
    if isinstance(records, dict):
        return IMGEDIT
    first = records[0][1] if records else {}
    return GEDIT if all(column in first for column in GEDIT_COLUMNS) else GENERIC


# ------------------------------------------------------------------------------------------------------ raw records
def _text(path: Path) -> str:
    try:
        with files.open_regular(path, "benchmark") as handle:
            return handle.read().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BenchmarkError(f"cannot read benchmark {path}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                             "bench") from None  # fmt: skip
    except OSError as exc:
        raise BenchmarkError(f"cannot read benchmark {path}: {files.os_reason(exc, path)}", "bench") from exc


def _records(path: Path) -> dict[str, Any] | list[tuple[int, dict[str, Any]]]:
    """A JSON object (ImgEdit), or (line, record) pairs of a JSON array, JSONL or CSV file."""
    text = _text(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return csv_records(text, path, _bench_error)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{path}: not JSON: {exc.msg} (line {exc.lineno})", "bench") from None
        if isinstance(data, dict):
            return data
        if isinstance(data, list) and all(isinstance(record, dict) for record in data):
            return [(number, record) for number, record in enumerate(data, start=1)]
        raise BenchmarkError(f"{path}: expected a JSON object ({IMGEDIT_FILE}) or an array of objects", "bench")
    return jsonl_records(text, path, _bench_error)


def _bench_error(message: str) -> BenchmarkError:
    return BenchmarkError(message, "bench")


def _string(record: dict[str, Any], name: str, where: str, required: bool = True) -> str | None:
    value = record.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BenchmarkError(f"{where}: missing {name!r}", "bench")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BenchmarkError(f"{where}: {name!r} must be a string, got {value!r}", "bench")
    return str(value).strip()


def _relative(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _safe_id(value: str, where: str) -> str:
    if not ID_PATTERN.fullmatch(value) or value.lower().endswith(".error"):
        raise BenchmarkError(f"{where}: bad id {value!r}: use letters, digits, '.', '_' and '-' (up to 200, starting "
                             "with a letter or digit)", "bench")  # fmt: skip
    return value


# ------------------------------------------------------------------------------------------------------ the formats
def _imgedit_items(path: Path, images: Path) -> list[EvalItem]:
    data = _records(path)
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: an ImgEdit benchmark is a JSON object {{key: {{id, prompt, edit_type}}}}",
                             "bench")  # fmt: skip
    items = []
    for key, record in data.items():
        where = f"{path}: item {key!r}"
        if not isinstance(record, dict):
            raise BenchmarkError(f"{where} is not a JSON object", "bench")
        image = _string(record, "id", where)
        items.append(EvalItem(
            id=_safe_id(str(key), where), image=_relative(images, image), instruction=_string(record, "prompt", where),
            category=_string(record, "edit_type", where), extra={"image_id": image},
        ))  # fmt: skip
    return items


def _generic_items(path: Path) -> list[EvalItem]:
    records = _records(path)
    if isinstance(records, dict):
        raise BenchmarkError(f"{path}: a generic benchmark is JSONL, a JSON array or CSV, one item a record", "bench")
    items = []
    for line, record in records:
        where = f"{path}: line {line}"
        unknown = sorted(set(record) - GENERIC_COLUMNS)
        if unknown:
            raise BenchmarkError(f"{where}: unknown column {', '.join(map(repr, unknown))} (known: "
                                 f"{', '.join(sorted(GENERIC_COLUMNS))})", "bench")  # fmt: skip
        image = _relative(path.parent, _string(record, "image", where))
        row_id = _string(record, "id", where, required=False)
        if row_id is None:
            row_id = re.sub(r"[^A-Za-z0-9._-]", "_", image.stem).lstrip("._-") or f"item{line}"
        reference = _string(record, "reference", where, required=False)
        items.append(EvalItem(
            id=_safe_id(row_id, where), image=image, instruction=_string(record, "prompt", where),
            category=_string(record, "category", where, required=False) or "all",
            reference=_relative(path.parent, reference) if reference else None,
        ))  # fmt: skip
    return items


def _gedit_items(path: Path, extract_dir: Path | None) -> list[EvalItem]:
    if path.is_dir() or path.suffix.lower() == ".parquet":
        return _gedit_parquet(path, extract_dir)
    records = _records(path)
    if isinstance(records, dict):
        raise BenchmarkError(f"{path}: a GEdit-Bench export is JSONL, a JSON array or CSV, one item a record", "bench")
    items = []
    for line, record in records:
        where = f"{path}: line {line}"
        image = record.get("input_image")
        if isinstance(image, dict):  # the hub's image struct {"bytes", "path"}, exported as JSON
            image = image.get("path")
        if not isinstance(image, str) or not image.strip():
            raise BenchmarkError(f"{where}: 'input_image' must be an image path relative to the file", "bench")
        items.append(_gedit_item(record, where, _relative(path.parent, image)))
    return items


def _gedit_item(record: dict[str, Any], where: str, image: Path) -> EvalItem:
    key = _string(record, "key", where)
    language = _string(record, "instruction_language", where)
    item_id = _safe_id(re.sub(r"[^A-Za-z0-9._-]", "_", f"{language}_{key}"), where)
    intersection = record.get("Intersection_exist", record.get("intersection_exist"))
    return EvalItem(
        id=item_id, image=image, instruction=_string(record, "instruction", where),
        category=_string(record, "task_type", where), language=language,
        extra={"key": key, "intersection_exist": _flag(intersection)},
    )  # fmt: skip


def _flag(value: Any) -> bool | None:
    if isinstance(value, bool) or value is None:
        return value
    return str(value).strip().lower() in ("true", "1", "yes")


def _gedit_parquet(path: Path, extract_dir: Path | None) -> list[EvalItem]:
    """GEdit's Parquet shards; the embedded input images are written once to ``extract_dir``."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchmarkError("reading GEdit-Bench's Parquet files needs pyarrow: pip install 'chronoedit[eval]' (or "
                             "export the dataset to JSONL with image paths)", "bench") from None  # fmt: skip
    if extract_dir is None:
        raise BenchmarkError("GEdit-Bench's Parquet files embed the images: give an output folder", "out")
    shards = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    items = []
    for shard in shards:
        columns = [*GEDIT_COLUMNS, "input_image"]
        try:
            table = pq.read_table(shard)
        except Exception as exc:  # pyarrow's own errors: a damaged or foreign file
            raise BenchmarkError(f"cannot read Parquet file {shard}: {' '.join(str(exc).split())}", "bench") from None
        missing = [name for name in columns if name not in table.column_names]
        if missing:
            raise BenchmarkError(f"{shard}: not a GEdit-Bench file (no column {', '.join(missing)})", "bench")
        extra = [c for c in ("Intersection_exist",) if c in table.column_names]
        for row, record in enumerate(table.select(columns + extra).to_pylist(), start=1):
            where = f"{shard}: row {row}"
            item = _gedit_item(record, where, Path())
            items.append(_with_image(item, record.get("input_image"), extract_dir, where))
    return items


def _with_image(item: EvalItem, image: Any, folder: Path, where: str) -> EvalItem:
    data = image.get("bytes") if isinstance(image, dict) else image
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BenchmarkError(f"{where}: 'input_image' holds no image bytes", "bench")
    target = folder / f"{item.id}.png"
    if not target.is_file():
        from PIL import Image

        from .. import media

        folder.mkdir(parents=True, exist_ok=True)
        with files.writing(target), Image.open(io.BytesIO(bytes(data))) as picture:
            media.save_image(media.to_rgb(picture), target)
    return EvalItem(item.id, target, item.instruction, item.category, item.language, None, item.extra)


def _check_unique(items: Iterable[EvalItem], path: Path) -> None:
    seen: set[str] = set()
    for item in items:
        key = item.id.lower()
        if key in seen:
            raise BenchmarkError(f"{path}: duplicate id {item.id!r}", "bench")
        seen.add(key)


def _check_images(items: list[EvalItem], path: Path) -> None:
    missing = [item for item in items if not item.image.is_file()]
    if missing:
        hint = " (give the image folder with --images)" if items and items[0].extra.get("image_id") else ""
        raise BenchmarkError(f"{path}: input image of item {missing[0].id!r} not found: {missing[0].image} "
                             f"({len(missing)} of {len(items)} missing){hint}", "bench")  # fmt: skip
    refs = [item for item in items if item.reference is not None and not item.reference.is_file()]
    if refs:
        raise BenchmarkError(f"{path}: reference image of item {refs[0].id!r} not found: {refs[0].reference}", "bench")
