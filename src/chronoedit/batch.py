"""Batch edits from a JSONL or CSV manifest (``chronoedit batch``), resumable and safe to kill at any moment.

Each manifest row is one edit. Row ``ID`` is written as ``DIR/ID.<fmt>`` (atomically), then its sidecar ``DIR/ID.json``
(atomically, after the image). A row is done when both exist and the sidecar parses and names that image; a rerun skips
done rows and redoes the rest (a row killed between its image and its sidecar is redone). A row that fails (bad image,
bad values) gets ``DIR/ID.error.json`` and the batch goes on. Every row goes through ``chronoedit edit``'s validation
(:func:`chronoedit.commands.edit.build_edit_job`) and the model is loaded once.

Exit codes: 0 when no row failed, 1 when some row failed, 2 for a bad manifest or bad flags (before the model loads).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from . import io as cio
from .commands import edit as edit_cmd
from .presets import PRESETS
from .runner import EditRunner

OUTPUT_FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
INT_FIELDS = ("seed", "num_inference_steps", "num_temporal_reasoning_steps", "height", "width", "max_area",
              "num_frames")  # fmt: skip
FLOAT_FIELDS = ("guidance_scale",)
BOOL_FIELDS = ("enable_temporal_reasoning",)
TEXT_FIELDS = ("negative_prompt", "output_format", "preset")
KNOWN_FIELDS = {"id", "input", "image", "prompt", *INT_FIELDS, *FLOAT_FIELDS, *BOOL_FIELDS, *TEXT_FIELDS}
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
LOCK_NAME = ".chronoedit-batch.lock"
CHECK_NAME = "batch-check.png"  # only probed for writability, never written
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


class ManifestError(ValueError):
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
    if path.is_dir():
        raise ManifestError(f"manifest {path} is a directory")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
    records = _csv_records(text, path) if path.suffix.lower() == ".csv" else _jsonl_records(text, path)
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


def _jsonl_records(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: cannot parse line {number}: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise ManifestError(f"{path}: line {number} is not a JSON object")
        records.append((number, record))
    return records


def _csv_records(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    records = []
    try:
        for record in reader:
            if None in record:
                raise ManifestError(f"{path}: line {reader.line_num} has more cells than the header")
            values = {k.strip(): v.strip() for k, v in record.items() if k is not None and v is not None and v.strip()}
            if values:
                records.append((reader.line_num, values))
    except csv.Error as exc:
        raise ManifestError(f"{path}: cannot parse line {reader.line_num}: {exc}") from exc
    return records


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
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip())
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _float(name: str, value: Any) -> float:
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            number = float(value.strip() if isinstance(value, str) else value)
            if math.isfinite(number):
                return number
    raise ValueError(f"{name} must be a finite number, got {value!r}")


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def output_format(row: Row, default: str) -> str:
    """The row's output suffix (png, jpg or webp); ValueError for anything else."""
    value = row.fields.get("output_format", default)
    fmt = OUTPUT_FORMATS.get(str(value).strip().lower().lstrip("."))
    if fmt is None:
        raise ValueError(f"output_format must be png, jpg or webp, got {value!r}")
    return fmt


def row_args(base: argparse.Namespace, row: Row, output: Path) -> argparse.Namespace:
    """``chronoedit edit`` arguments for one row: the batch's flags with the row's values on top."""
    args = copy.copy(base)
    args.input, args.prompt, args.output = str(row.input), row.prompt, output
    args.output_image = args.trajectory = args.trajectory_sheet = None
    values = row.fields
    for name in INT_FIELDS:
        if name in values:
            setattr(args, name, _int(name, values[name]))
    for name in FLOAT_FIELDS:
        if name in values:
            setattr(args, name, _float(name, values[name]))
    if "negative_prompt" in values:
        if not isinstance(values["negative_prompt"], str):
            raise ValueError(f"negative_prompt must be a string, got {values['negative_prompt']!r}")
        args.negative_prompt = values["negative_prompt"]
    if "preset" in values:  # the row's preset sets what the row itself does not
        if values["preset"] not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(sorted(PRESETS))}, got {values['preset']!r}")
        args.preset = values["preset"]
        for name in ("num_inference_steps", "guidance_scale", "flow_shift", "max_area"):
            if name not in values:
                setattr(args, name, None)
    if "enable_temporal_reasoning" in values:
        args.enable_temporal_reasoning = _bool("enable_temporal_reasoning", values["enable_temporal_reasoning"])
        if not args.enable_temporal_reasoning:  # the batch's reasoning defaults do not apply to this row
            for name in ("num_temporal_reasoning_steps", "num_frames"):
                if name not in values:
                    setattr(args, name, None)
    if ("height" in values) != ("width" in values):  # a row's size replaces the batch's as a pair
        raise ValueError("height and width must be given together in a row")
    if "max_area" in values and "height" not in values:  # the row sizes itself by area, not at the batch's size
        args.height = args.width = None
    args.quiet = True  # no per-row notes; the batch reports
    return args


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


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file next to it, then ``os.replace``)."""
    with cio.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_inputs_kept(rows: list[Row], out_dir: Path, default_fmt: str) -> None:
    """ManifestError when a row's output (image, sidecar or error record) would be written over an input image."""
    inputs = {key: row for row in rows if (key := _file_key(row.input)) is not None}
    for row in rows:
        names = [sidecar_path(out_dir, row.id).name, error_path(out_dir, row.id).name]
        with contextlib.suppress(ValueError):  # a bad output_format fails that row later
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
    """One batch per output folder at a time (an flock, released by the OS even on SIGKILL)."""
    return cio.locked(out_dir / LOCK_NAME, f"another chronoedit batch is writing to {out_dir}")


def remove_stale_temp_files(out_dir: Path) -> list[Path]:
    """Temp files of atomic writes (and writability probes) left by a killed batch; call while holding the lock."""
    stale = [p for p in out_dir.iterdir() if p.is_file() and cio.is_temp_name(p.name)]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _sidecar(job: edit_cmd.EditJob, row: Row, args: argparse.Namespace, manifest: Path, fmt: str,
             run_id: str, timings: dict[str, float], started: str) -> dict[str, Any]:  # fmt: skip
    """The exact settings used for one row, with provenance and timings."""
    return {
        "id": row.id,
        "manifest": str(manifest.resolve()),
        "manifest_line": row.line,
        "input": str(row.input.resolve()),
        "output": f"{row.id}.{fmt}",
        "output_format": fmt,
        "prompt": row.prompt,
        "prompt_used": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "num_inference_steps": job.num_inference_steps,
        "guidance_scale": job.guidance_scale,
        "flow_shift": job.flow_shift,
        "enable_temporal_reasoning": job.enable_temporal_reasoning,
        "num_temporal_reasoning_steps": job.num_temporal_reasoning_steps,
        "num_frames": job.num_frames,
        "height": job.height,
        "width": job.width,
        "model_path": job.model_path,
        "transformer": str(job.transformer_path) if job.transformer_path else None,
        "device": job.device,
        "dtype": job.dtype,
        "preset": args.preset,
        "loras": [[str(path), scale] for path, scale in job.loras],
        "chronoedit_version": __version__,
        "run_id": run_id,
        "started_at": started,
        "finished_at": _now(),
        "timings": {key: round(value, 4) for key, value in timings.items()},
    }


def run_batch(manifest: str | Path, out_dir: str | Path, args: argparse.Namespace) -> Summary:
    """Run every row of ``manifest`` not yet done in ``out_dir``; ``args`` are ``chronoedit batch``'s flags.

    Manifest and flag errors raise (ValueError / ManifestError) before the model is loaded; row errors are recorded.
    """
    manifest, out_dir = Path(manifest), Path(out_dir)
    rows = read_manifest(manifest)
    default_fmt = OUTPUT_FORMATS.get(args.output_format.lower().lstrip("."))
    if default_fmt is None:
        raise ValueError(f"--output-format must be png, jpg or webp, got {args.output_format!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is not a directory")
    check_inputs_kept(rows, out_dir, default_fmt)
    # The batch's own flags, checked once through edit's validation (the shipped example image stands in for rows).
    check = copy.copy(args)
    check.input, check.prompt, check.output = None, "batch check", out_dir / CHECK_NAME
    check.output_image = check.trajectory = check.trajectory_sheet = None
    model_job = edit_cmd.build_edit_job(check)  # creates out_dir
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"
    summary = Summary()
    with batch_lock(out_dir):
        remove_stale_temp_files(out_dir)
        pending = []
        for row in rows:
            try:
                fmt = output_format(row, default_fmt)
            except ValueError:
                fmt = None  # the row fails below, with its error recorded
            if fmt is not None and is_done(out_dir, row.id, fmt):
                summary.skipped += 1
            else:
                pending.append(row)
        runner: EditRunner | None = None
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), initial=summary.skipped, desc="batch", unit="row", disable=args.quiet,
                   file=sys.stderr, dynamic_ncols=True)  # fmt: skip
        try:
            for row in pending:
                bar.set_postfix_str(row.id)
                if runner is None:  # loaded once, before the first row that runs; its errors end the batch (exit 2)
                    t_load = time.perf_counter()
                    runner = EditRunner(model_job)
                    with contextlib.suppress(AttributeError):
                        runner.load().set_progress_bar_config(disable=True)
                    summary.model_load_s = time.perf_counter() - t_load
                try:
                    _run_row(runner, row, args, manifest, out_dir, default_fmt, run_id)
                except Exception as exc:  # a failed row is recorded and the batch goes on
                    summary.failed += 1
                    message = _one_line(exc)
                    summary.failures.append(f"{row.id}: {message}")
                    write_json(error_path(out_dir, row.id), {
                        "id": row.id, "manifest_line": row.line, "input": str(row.input.absolute()), "error": message,
                        "error_type": type(exc).__name__, "run_id": run_id, "time": _now(),
                        "chronoedit_version": __version__,
                    })  # fmt: skip
                    bar.write(f"chronoedit: row {row.id} (line {row.line}) failed: {message}", file=sys.stderr)
                else:
                    summary.done += 1
                    with contextlib.suppress(FileNotFoundError):
                        error_path(out_dir, row.id).unlink()
                bar.update(1)
        finally:
            bar.close()
    return summary


def _run_row(runner: EditRunner, row: Row, args: argparse.Namespace, manifest: Path, out_dir: Path, default_fmt: str,
             run_id: str) -> None:  # fmt: skip
    """Validate, edit and write one row: the image atomically, then its sidecar atomically."""
    started, t0 = _now(), time.perf_counter()
    fmt = output_format(row, default_fmt)
    job_args = row_args(args, row, out_dir / f"{row.id}.{fmt}")
    job = edit_cmd.build_edit_job(job_args)
    timings = {"prepare_s": time.perf_counter() - t0}
    t1 = time.perf_counter()
    out = runner.run(job)
    timings["generate_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    edit_cmd.write_outputs(job, out, echo=False)  # the batch has its own summary
    timings["write_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    write_json(sidecar_path(out_dir, row.id), _sidecar(job, row, job_args, manifest, fmt, run_id, timings, started))
