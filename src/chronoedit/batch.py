"""Batch edits from a JSONL or CSV manifest (``chronoedit batch``), resumable and safe to kill at any moment.

Each manifest row is one edit. Row ``ID`` is written as ``DIR/ID.<fmt>`` (atomically), then its sidecar ``DIR/ID.json``
(atomically, after the image). A row is done when both exist and the sidecar parses and names that image; a rerun skips
done rows and redoes the rest (a row killed between its image and its sidecar is redone). A row that fails (bad image,
bad values: a user error) gets ``DIR/ID.error.json`` and the batch goes on; anything else is a bug and stops the batch.
Every row's settings are the batch's with the row's values on top (:meth:`chronoedit.editing.EditSettings.overlay`),
resolved by the application layer like any edit, and the model is loaded once (:class:`chronoedit.editing.EditRunner`).

The same rows can run over the ranks of a ``torchrun`` (:mod:`chronoedit.batch_ranks`) or on Ray actors
(:mod:`chronoedit.batch_ray`): both use this module's pieces (:func:`prepare`, :func:`batch_lock`, :func:`start_folder`,
:func:`run_rows` / :func:`run_row_recorded`), so outputs, sidecars and resume rules are the same.

Exit codes: 0 when no row failed, 1 when some row failed, 2 for a bad manifest or bad flags (before the model loads).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__, files
from .editing import Edit, EditRunner, EditSettings, ModelSpec, OutputPlan, resolve_edit, write_outputs
from .errors import UserError, one_line
from .media import OUTPUT_FORMATS
from .records import csv_records, jsonl_records

INT_FIELDS = ("seed", "num_inference_steps", "num_temporal_reasoning_steps", "height", "width", "max_area",
              "num_frames")  # fmt: skip
FLOAT_FIELDS = ("guidance_scale",)
BOOL_FIELDS = ("enable_temporal_reasoning", "cfg_batch")
TEXT_FIELDS = ("negative_prompt", "output_format", "preset", "cache")
KNOWN_FIELDS = {"id", "input", "image", "prompt", *INT_FIELDS, *FLOAT_FIELDS, *BOOL_FIELDS, *TEXT_FIELDS}
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
LOCK_NAME = ".chronoedit-batch.lock"
RANKS_LOCK_NAME = ".chronoedit-batch.ranks.lock"  # see batch_lock
TICKETS_NAME = ".chronoedit-batch.tickets"  # the next row of a multi-process batch (chronoedit.batch_ranks)
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


class ManifestError(UserError):
    """A manifest that cannot be run at all (reported as one line, exit code 2, before the model loads)."""


@dataclass
class Row:
    """One manifest row: its line number, id, input path (resolved) and its raw fields (empty values dropped)."""

    line: int
    id: str
    input: Path
    prompt: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Summary:
    """Counts of one batch run."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    model_load_s: float | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def line(self, out_dir: Path) -> str:
        return f"batch: {self.done} done, {self.skipped} skipped, {self.failed} failed (outputs in {out_dir})"


# ----------------------------------------------------------------------------------------------------------- manifest
def read_manifest(path: str | Path) -> list[Row]:
    """Parse and check a manifest (``.csv`` is CSV with a header row, anything else JSONL); ManifestError if bad."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}")
    try:
        with files.open_regular(path, "manifest") as handle:
            text = handle.read().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"cannot read manifest {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {files.os_reason(exc, path)}") from exc
    reader = csv_records if path.suffix.lower() == ".csv" else jsonl_records
    records = reader(text, path, ManifestError)
    if not records:
        raise ManifestError(f"manifest {path} is empty: no rows")
    rows = [_make_row(line, record, path) for line, record in records]
    seen: dict[str, Row] = {}
    for row in rows:
        key = row.id.lower()  # case-insensitive file systems
        if key in seen:
            raise ManifestError(
                f"{path}: duplicate id '{row.id}' in line {row.line} (also line {seen[key].line}); "
                "give each row a unique 'id'"
            )
        seen[key] = row
    return rows


def _make_row(line: int, record: dict[str, Any], path: Path) -> Row:
    unknown = sorted(set(record) - KNOWN_FIELDS)
    if unknown:
        raise ManifestError(
            f"{path}: unknown field {', '.join(map(repr, unknown))} in line {line} "
            f"(known: {', '.join(sorted(KNOWN_FIELDS))})"
        )
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ManifestError(f"{path}: missing prompt in line {line}")
    if "input" in record and "image" in record:
        raise ManifestError(f"{path}: line {line} has both 'input' and 'image'; give one")
    source = record.get("input", record.get("image"))
    if not isinstance(source, str) or not source.strip():
        raise ManifestError(f"{path}: missing input image ('input' or 'image') in line {line}")
    input_path = Path(source).expanduser()
    if not input_path.is_absolute():
        input_path = path.parent / input_path
    row_id = record.get("id")
    if row_id is None:
        row_id = re.sub(r"[^A-Za-z0-9._-]", "_", input_path.stem).lstrip("._-") or f"row{line}"
    elif isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise ManifestError(f"{path}: id in line {line} must be a string, got {row_id!r}")
    row_id = str(row_id)
    if not ID_PATTERN.fullmatch(row_id) or row_id.lower().endswith(".error"):
        raise ManifestError(
            f"{path}: bad id {row_id!r} in line {line}: use letters, digits, '.', '_' and '-' (up to 200, "
            "starting with a letter or digit, not ending in '.error')"
        )
    fields = {k: v for k, v in record.items() if k not in ("id", "input", "image", "prompt") and v is not None}
    return Row(line=line, id=row_id, input=input_path, prompt=prompt, fields=fields)


# -------------------------------------------------------------------------------------------------------- row values
def _int(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip())
    raise UserError(f"{{{name}}} must be an integer, got {value!r}", name)


def _float(name: str, value: Any) -> float:
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            number = float(value.strip() if isinstance(value, str) else value)
            if math.isfinite(number):
                return number
    raise UserError(f"{{{name}}} must be a finite number, got {value!r}", name)


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UserError(f"{{{name}}} must be true or false, got {value!r}", name)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise UserError(f"{{{name}}} must be a string, got {value!r}", name)
    return value


_CONVERT = {**dict.fromkeys(INT_FIELDS, _int), **dict.fromkeys(FLOAT_FIELDS, _float),
            **dict.fromkeys(BOOL_FIELDS, _bool), "negative_prompt": _text, "preset": _text, "cache": _text}  # fmt: skip


def output_format(row: Row, default: str) -> str:
    """The row's output suffix (png, jpg or webp); UserError for anything else."""
    value = row.fields.get("output_format", default)
    fmt = OUTPUT_FORMATS.get(str(value).strip().lower().lstrip("."))
    if fmt is None:
        raise UserError(f"{{output_format}} must be png, jpg or webp, got {value!r}", "output_format")
    return fmt


def row_settings(defaults: EditSettings, row: Row) -> EditSettings:
    """The row's edit settings: the batch's with the row's own values on top."""
    changes = {name: convert(name, row.fields[name]) for name, convert in _CONVERT.items() if name in row.fields}
    return defaults.overlay({"prompt": row.prompt, **changes})


# --------------------------------------------------------------------------------------------------------- the batch
def sidecar_path(out_dir: Path, row_id: str) -> Path:
    return out_dir / f"{row_id}.json"


def error_path(out_dir: Path, row_id: str) -> Path:
    return out_dir / f"{row_id}.error.json"


def is_done(out_dir: Path, row_id: str, fmt: str) -> bool:
    """Done: the image and its sidecar exist and the sidecar parses and names this image."""
    image, sidecar = out_dir / f"{row_id}.{fmt}", sidecar_path(out_dir, row_id)
    if not (image.is_file() and sidecar.is_file()):
        return False
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("output") == image.name


def check_inputs_kept(rows: list[Row], out_dir: Path, default_fmt: str) -> None:
    """ManifestError when a row's output (image, sidecar or error record) would be written over an input image."""
    inputs = {key: row for row in rows if (key := _file_key(row.input)) is not None}
    for row in rows:
        names = [sidecar_path(out_dir, row.id).name, error_path(out_dir, row.id).name]
        with contextlib.suppress(UserError):  # a bad output_format fails that row later
            names.append(f"{row.id}.{output_format(row, default_fmt)}")
        for name in names:
            owner = inputs.get(_file_key(out_dir / name))
            if owner is not None:
                raise ManifestError(
                    f"row {row.id} (line {row.line}) would write {out_dir / name}, the input image of line "
                    f"{owner.line}: choose another --out or another id"
                )


def _file_key(path: Path) -> str | None:
    """The file ``path`` names, compared without letter case (case-insensitive file systems: IMG_1.JPG is
    IMG_1.jpg); None when it cannot be resolved (a symlink loop: that row fails on its own later)."""
    try:
        return os.path.normcase(str(path.resolve())).casefold()
    except (OSError, RuntimeError):
        return None


def batch_lock(out_dir: Path) -> contextlib.AbstractContextManager[None]:
    """One batch per output folder at a time: an flock on the folder's lock file, and one on its ranks file (held
    shared by every rank of a multi-process batch, :mod:`chronoedit.batch_ranks`, so the ranks of a run whose first
    rank died still keep others out). The OS releases both even on SIGKILL."""
    stack = contextlib.ExitStack()
    busy = busy_message(out_dir)
    stack.enter_context(files.locked(out_dir / LOCK_NAME, busy))
    stack.enter_context(files.locked(out_dir / RANKS_LOCK_NAME, busy))
    return stack


def busy_message(out_dir: Path) -> str:
    return f"another chronoedit batch is writing to {out_dir}"


def remove_stale_temp_files(out_dir: Path) -> list[Path]:
    """Temp files of atomic writes (and writability probes) left by a killed batch, and a killed multi-process
    batch's ticket file; call while holding the lock."""
    stale = [p for p in out_dir.iterdir() if p.is_file() and (files.is_temp_name(p.name) or p.name == TICKETS_NAME)]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Batch:
    """One batch run: the manifest, the output folder, the model, every row's default settings, the default output
    format and this run's id (recorded in sidecars)."""

    manifest: Path
    out_dir: Path
    model: ModelSpec
    defaults: EditSettings
    output_format: str = "png"
    run_id: str = field(default_factory=lambda: f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}")
    worker: str | None = None  # which process of a parallel run wrote a row ("rank 1 of 2", "ray pid@host")


def _sidecar(batch: Batch, edit: Edit, row: Row, fmt: str, timings: dict[str, float],
             started: str) -> dict[str, Any]:  # fmt: skip
    """The exact settings used for one row, with provenance and timings."""
    spec = batch.model
    return {
        "id": row.id, "manifest": str(batch.manifest.resolve()), "manifest_line": row.line,
        "input": str(row.input.resolve()), "output": f"{row.id}.{fmt}", "output_format": fmt, "prompt": row.prompt,
        "prompt_used": edit.prompt, "negative_prompt": edit.negative_prompt, "seed": edit.seed,
        "num_inference_steps": edit.num_inference_steps, "guidance_scale": edit.guidance_scale,
        "flow_shift": edit.flow_shift, "enable_temporal_reasoning": edit.enable_temporal_reasoning,
        "num_temporal_reasoning_steps": edit.num_temporal_reasoning_steps, "num_frames": edit.num_frames,
        "height": edit.height, "width": edit.width, "model_path": spec.model_path,
        "transformer": str(spec.transformer) if spec.transformer else None, "device": spec.device,
        "dtype": spec.dtype, "preset": edit.preset, "loras": [[str(lora.path), lora.scale] for lora in edit.loras],
        "chronoedit_version": __version__, "run_id": batch.run_id, "worker": batch.worker, "started_at": started,
        "finished_at": _now(),
        "timings": {key: round(value, 4) for key, value in timings.items()},
    }  # fmt: skip


def run_batch(batch: Batch, quiet: bool = False, runner: EditRunner | None = None) -> Summary:
    """Run every row of the manifest not yet done in the output folder, on ``runner`` (default: one for the batch's
    model, loaded before the first row that runs).

    A bad manifest raises (ManifestError) before the model is loaded; a row's user error is recorded in its error
    file and the batch goes on; any other exception is a bug and ends the batch.
    """
    rows = prepare(batch)
    with batch_lock(batch.out_dir):
        pending, skipped = start_folder(batch, rows)
        summary = Summary(skipped=skipped)
        with progress_bar(len(rows), skipped, quiet) as bar:
            run_rows(batch, pending, runner or EditRunner(batch.model), summary, bar)
    return summary


def prepare(batch: Batch) -> list[Row]:
    """The manifest's rows, checked, and the output folder, created: every check that needs no lock and no model."""
    rows = read_manifest(batch.manifest)
    if batch.out_dir.exists() and not batch.out_dir.is_dir():
        raise UserError(f"{{out}} {batch.out_dir} is not a directory", "out")
    check_inputs_kept(rows, batch.out_dir, batch.output_format)
    batch.out_dir.mkdir(parents=True, exist_ok=True)
    return rows


def start_folder(batch: Batch, rows: list[Row]) -> tuple[list[Row], int]:
    """Clean what a killed batch left and find the rows to run: (pending rows, count of rows already done). Call while
    holding the folder's lock."""
    remove_stale_temp_files(batch.out_dir)
    pending = [row for row in rows if not _done(batch, row)]
    return pending, len(rows) - len(pending)


def progress_bar(total: int, initial: int, quiet: bool) -> Any:
    """The batch's progress bar on stderr (a context manager; ``quiet``: hidden)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="batch", unit="row", disable=quiet, file=sys.stderr,
                dynamic_ncols=True)  # fmt: skip


def run_rows(batch: Batch, rows: Iterable[Row], runner: EditRunner, summary: Summary, bar: Any,
             writes: bool = True, advance: Callable[[], None] | None = None,
             lockstep: bool = False) -> None:  # fmt: skip
    """Run ``rows`` one after the other on ``runner`` (loaded before the first row if it is not yet), counting each
    in ``summary``; after each row ``advance`` (default: one step of ``bar``). ``writes`` False runs the rows without
    writing anything, ``lockstep`` says the ranks compute every row together (:func:`run_row_recorded`)."""
    advance = advance or (lambda: bar.update(1))
    for row in rows:
        bar.set_postfix_str(row.id)
        if runner.pipe is None:  # loaded before the first row that runs; its errors end the batch
            t_load = time.perf_counter()
            runner.load()
            summary.model_load_s = time.perf_counter() - t_load
        message = run_row_recorded(runner, batch, row, writes, lockstep)
        if message is None:
            summary.done += 1
        else:
            summary.failed += 1
            summary.failures.append(f"{row.id}: {message}")
            bar.write(f"chronoedit: row {row.id} (line {row.line}) failed: {message}", file=sys.stderr)
        advance()


def _done(batch: Batch, row: Row) -> bool:
    try:
        return is_done(batch.out_dir, row.id, output_format(row, batch.output_format))
    except UserError:
        return False  # a bad output_format: the row fails when it runs, with its error recorded


def run_row_recorded(runner: EditRunner, batch: Batch, row: Row, writes: bool = True,
                     lockstep: bool = False) -> str | None:  # fmt: skip
    """Run one row; None when it succeeded, else its user error as one line (recorded in its error file when
    ``writes``). ``lockstep``: the ranks run this row together (context parallel), so a device out of memory on one
    rank ends the batch instead of failing the row (the other ranks would wait for it inside the row)."""
    try:
        _run_row(runner, batch, row, writes)
    except UserError as exc:
        if files.is_out_of_space(exc):  # every later row would fail alike: stop here, resumable once there is room
            raise
        message, kind = exc.render(), type(exc).__name__  # fields by their manifest column names
    except Exception as exc:
        if type(exc).__name__ != "OutOfMemoryError" or lockstep:  # else a row too large for the device: it fails
            raise
        message, kind = one_line(exc), type(exc).__name__
    else:
        if writes:
            with contextlib.suppress(FileNotFoundError):
                error_path(batch.out_dir, row.id).unlink()
        return None
    if not writes:
        return message
    record = error_path(batch.out_dir, row.id)
    with files.writing(record):
        files.write_json(record, {
            "id": row.id, "manifest_line": row.line, "input": str(row.input.absolute()), "error": message,
            "error_type": kind, "run_id": batch.run_id, "time": _now(), "chronoedit_version": __version__,
        })  # fmt: skip
    return message


def _run_row(runner: EditRunner, batch: Batch, row: Row, writes: bool = True) -> None:
    """Resolve, edit and write one row (when ``writes``): the image atomically, then its sidecar atomically."""
    started, t0 = _now(), time.perf_counter()
    fmt = output_format(row, batch.output_format)
    edit = resolve_edit(row_settings(batch.defaults, row), batch.model, row.input)
    plan = OutputPlan(output=batch.out_dir / f"{row.id}.{fmt}")
    timings = {"prepare_s": time.perf_counter() - t0}
    t1 = time.perf_counter()
    out = runner.run(edit)
    timings["generate_s"] = time.perf_counter() - t1
    if not writes:
        return
    t2 = time.perf_counter()
    write_outputs(edit, plan, out)
    timings["write_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    sidecar = sidecar_path(batch.out_dir, row.id)
    with files.writing(sidecar):
        files.write_json(sidecar, _sidecar(batch, edit, row, fmt, timings, started))
