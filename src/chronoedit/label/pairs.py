"""Finding the (source, target) image pairs to label: a folder of pairs or a CSV, each pair named for errors.

Folder conventions (checked in this order):

* ``DIR/source/NAME.ext`` + ``DIR/target/NAME.ext`` (matched by file name without suffix), or
* ``DIR/NAME_source.ext`` + ``DIR/NAME_target.ext`` (also ``_src``/``_tgt`` and ``_before``/``_after``).

CSV: a header row with ``source`` and ``target`` columns (``source_image``/``target_image`` and ``before``/``after``
also work, so a chronoedit dataset's own ``metadata.csv`` can be relabelled), optionally ``key`` and ``instruction``
(a known instruction skips stage 1). Relative paths are relative to the CSV's folder. Without a key column the key is
the file name without suffix (``SOURCE-TARGET`` when the two names differ).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..media import IMAGE_SUFFIXES, image_size

SUFFIX_PAIRS = (("_source", "_target"), ("_src", "_tgt"), ("_before", "_after"))
COLUMN_ALIASES = {
    "source": ("source", "source_image", "before"),
    "target": ("target", "target_image", "after"),
    "key": ("key", "id"),
    "instruction": ("instruction",),
}
KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class PairsError(UserError):
    """Input pairs that cannot be labelled; the message names the CSV line or the file."""


@dataclass(frozen=True)
class Pair:
    """One pair to label: its dataset key, the two image paths, where it came from and a known instruction."""

    key: str
    source: Path
    target: Path
    origin: str  # "pairs.csv line 3" or "source/cat.png"
    instruction: str | None = None
    problem: str | None = None  # known when read: an image without its other half (a bad pair, see check_pair)


def read_pairs(path: str | Path) -> list[Pair]:
    """The pairs in a folder or CSV (see the module docstring); PairsError naming the problem otherwise."""
    path = Path(path)
    if not path.exists():
        raise PairsError(f"pairs not found: {path} (give a folder of pairs or a CSV with source,target columns)")
    pairs = _read_folder(path) if path.is_dir() else _read_csv(path)
    seen: dict[str, Pair] = {}
    for pair in pairs:
        other = seen.setdefault(pair.key.lower(), pair)
        if other is not pair:
            raise PairsError(
                f"duplicate key '{pair.key}' in {pair.origin} (also {other.origin}); keys must be unique "
                "(a CSV can give them in a 'key' column)"
            )
    return pairs


def make_key(text: str, origin: str) -> str:
    """A file-name-safe dataset key from a name (other characters become '_'); PairsError if nothing is left."""
    key = re.sub(r"[^A-Za-z0-9._-]", "_", text.strip()).lstrip("._-")[:200]
    if not KEY_PATTERN.fullmatch(key):
        raise PairsError(f"{origin}: cannot make a key from {text!r}; use letters, digits, '.', '_' or '-'")
    return key


# ---------------------------------------------------------------------------------------------------------- folders
def _images(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise PairsError(f"cannot read the pairs folder {folder}: {exc.strerror or exc}") from exc


def _read_folder(folder: Path) -> list[Pair]:
    if (folder / "source").is_dir() and (folder / "target").is_dir():
        return _read_subfolders(folder)
    pairs: list[Pair] = []
    for source_suffix, target_suffix in SUFFIX_PAIRS:
        pairs += _read_suffixed(folder, source_suffix, target_suffix)
    if not pairs:
        raise PairsError(
            f"no pairs found in {folder}: expected source/NAME.png + target/NAME.png, or NAME_source.png + "
            "NAME_target.png (png, jpg, jpeg or webp), or a CSV file"
        )
    return sorted(pairs, key=lambda pair: pair.key)


def _by_stem(files: list[Path], folder_name: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in files:
        if path.stem in found:
            raise PairsError(f"{folder_name}/{path.name} and {folder_name}/{found[path.stem].name} share a name")
        found[path.stem] = path
    return found


def _read_subfolders(folder: Path) -> list[Pair]:
    sources = _by_stem(_images(folder / "source"), "source")
    targets = _by_stem(_images(folder / "target"), "target")
    if not sources and not targets:
        raise PairsError(f"no pairs found in {folder}: source/ and target/ hold no png, jpg, jpeg or webp images")
    pairs = []
    for stem in sorted(sources.keys() | targets.keys()):
        source, target = sources.get(stem), targets.get(stem)
        origin = f"source/{source.name}" if source is not None else f"target/{target.name}"  # type: ignore[union-attr]
        problem = None
        if target is None:
            problem = f"{origin} has no target image (expected target/{stem}.png or .jpg/.webp)"
        elif source is None:
            problem = f"{origin} has no source image (expected source/{stem}.png or .jpg/.webp)"
        pairs.append(Pair(make_key(stem, origin), source or folder / "source" / f"{stem}.png",
                          target or folder / "target" / f"{stem}.png", origin, problem=problem))  # fmt: skip
    return pairs


def _read_suffixed(folder: Path, source_suffix: str, target_suffix: str) -> list[Pair]:
    files = _images(folder)
    sources = _by_stem([p for p in files if p.stem.lower().endswith(source_suffix)], folder.name)
    targets = _by_stem([p for p in files if p.stem.lower().endswith(target_suffix)], folder.name)
    names = {stem[: -len(source_suffix)]: path for stem, path in sources.items()}
    target_names = {stem[: -len(target_suffix)]: path for stem, path in targets.items()}
    pairs = []
    for name in sorted(names.keys() | target_names.keys()):
        source, target = names.get(name), target_names.get(name)
        origin = (source or target).name  # type: ignore[union-attr]
        problem = None
        if target is None:
            problem = f"{origin} has no target image (expected {name}{target_suffix}.png or .jpg/.webp)"
        elif source is None:
            problem = f"{origin} has no source image (expected {name}{source_suffix}.png or .jpg/.webp)"
        pairs.append(Pair(make_key(name, origin), source or folder / f"{name}{source_suffix}.png",
                          target or folder / f"{name}{target_suffix}.png", origin, problem=problem))  # fmt: skip
    return pairs


# -------------------------------------------------------------------------------------------------------------- CSV
def _read_csv(path: Path) -> list[Pair]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PairsError(f"cannot read pairs CSV {path}: {exc}") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    header = [name.strip().lower() for name in reader.fieldnames or []]
    if not header:
        raise PairsError(f"pairs CSV {path} is empty: it needs a header row with source,target columns and rows")
    columns = {role: next((name for name in aliases if name in header), None)
               for role, aliases in COLUMN_ALIASES.items()}  # fmt: skip
    missing = [role for role in ("source", "target") if columns[role] is None]
    if missing:
        raise PairsError(f"pairs CSV {path} has no {' or '.join(missing)} column (header: {', '.join(header)})")
    reader.fieldnames = header
    pairs = []
    try:
        for record in reader:
            if any(value and value.strip() for value in record.values() if isinstance(value, str)):
                pairs.append(_csv_pair(record, columns, path, reader.line_num))
    except csv.Error as exc:
        raise PairsError(f"{path.name} line {reader.line_num}: cannot parse: {exc}") from exc
    if not pairs:
        raise PairsError(f"pairs CSV {path} is empty: it has a header but no rows")
    return pairs


def _csv_pair(record: dict, columns: dict[str, str | None], path: Path, line: int) -> Pair:
    origin = f"{path.name} line {line}"
    if None in record:
        raise PairsError(f"{origin}: more cells than the header has columns")

    def cell(role: str) -> str:
        name = columns[role]
        return (record.get(name) or "").strip() if name else ""

    images = {}
    for role in ("source", "target"):
        if not cell(role):
            raise PairsError(f"{origin}: the {columns[role]} cell is empty")
        image = Path(cell(role)).expanduser()
        images[role] = image if image.is_absolute() else path.parent / image
    stems = images["source"].stem, images["target"].stem
    key = make_key(cell("key") or (stems[0] if stems[0] == stems[1] else "-".join(stems)), origin)
    return Pair(key, images["source"], images["target"], origin, cell("instruction") or None)


# ----------------------------------------------------------------------------------------------------- pre-flight
def check_pair(pair: Pair) -> str | None:
    """What is wrong with a pair before any decoding (missing, unreadable, different sizes), naming it; else None.

    Pairs are the two frames of one video, so their sizes must be equal: resize them beforehand if needed.
    """
    if pair.problem is not None:
        return pair.problem
    sizes = {}
    for role in ("source", "target"):
        path = getattr(pair, role)
        try:
            sizes[role] = image_size(path)
        except (OSError, ValueError) as exc:
            return f"{pair.origin}: {role} image {path}: {exc}"
    if sizes["source"] != sizes["target"]:
        (sw, sh), (tw, th) = sizes["source"], sizes["target"]
        return (f"{pair.origin}: source and target sizes differ ({sw}x{sh} vs {tw}x{th}); a pair is two frames of one "
                "video, so resize them to the same size first")  # fmt: skip
    return None
