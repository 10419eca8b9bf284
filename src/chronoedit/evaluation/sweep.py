"""``--sweep KEY=V1,V2,...``: one run per value of one edit setting, each in its own folder ``OUT/KEY=VALUE``."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..editing import EditSettings
from ..errors import UserError
from .items import Benchmark
from .run import EvalRun

_FIELDS = {f.name: str(f.type) for f in dataclasses.fields(EditSettings)}
_NOT_SWEPT = {"prompt"}  # the benchmark gives it


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2`` -> (KEY, converted values); UserError for an unknown key or a value of the wrong type."""
    key, sep, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not values.strip():
        raise UserError(f"{{sweep}} must be KEY=V1,V2,..., got {text!r}", "sweep")
    if key not in _FIELDS or key in _NOT_SWEPT:
        known = ", ".join(sorted(set(_FIELDS) - _NOT_SWEPT))
        raise UserError(f"{{sweep}} cannot vary {key!r}: use an edit setting ({known})", "sweep")
    parsed = [_convert(key, value.strip()) for value in values.split(",")]
    if len(set(map(repr, parsed))) != len(parsed):
        raise UserError(f"{{sweep}} lists a value of {key} twice", "sweep")
    return key, parsed


def _convert(key: str, value: str) -> Any:
    kind = _FIELDS[key]
    if value.lower() in ("none", "default", ""):
        if "None" not in kind:
            raise UserError(f"{{sweep}}: {key} needs a value", "sweep")
        return None
    try:
        if kind.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes", "on")
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
    except ValueError:
        raise UserError(f"{{sweep}}: {key} value {value!r} is not {kind.split(' ')[0]}", "sweep") from None
    return value


def sweep_runs(benchmark: Benchmark, out_dir: Path, settings: EditSettings, key: str, values: list[Any],
               outputs: Path | None = None) -> list[EvalRun]:  # fmt: skip
    """One run per value, ``settings`` with that value on top, in ``out_dir/KEY=VALUE``."""
    runs = []
    for value in values:
        label = f"{key}={value}"
        runs.append(EvalRun(benchmark, out_dir / label, settings.overlay({key: value}), outputs, label))
    return runs
