"""Records of JSON Lines and CSV files (batch manifests, benchmark lists): each with the line it starts at.

One reader for every such file, so they all obey the same rules: JSON lines end at ``\\n`` only (JSON strings may
hold U+2028 and other characters ``str.splitlines()`` splits at), a CSV header may not name a column twice, a quoted
CSV cell may span lines and a record is named by the line it starts at. Errors are ``error(message)``: the caller's
:class:`~chronoedit.errors.UserError` subclass.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

Record = tuple[int, dict[str, Any]]
ErrorType = Callable[[str], UserError]


def jsonl_records(text: str, path: Path, error: ErrorType = UserError) -> list[Record]:
    """(line number, object) for every non-empty line of a JSON Lines text; ``error(message)`` otherwise."""
    records = []
    # Lines end at "\n" only: JSON strings may hold U+2028 and other characters str.splitlines() would split at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}: cannot parse line {number}: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise error(f"{path}: line {number} is not a JSON object")
        records.append((number, record))
    return records


def csv_records(text: str, path: Path, error: ErrorType = UserError) -> list[Record]:
    """(line where the record starts, its non-empty cells by column) for each CSV record after the header."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, records, start = None, [], 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1  # a quoted cell may span lines: a record starts after the last
            if not any(cell.strip() for cell in cells):
                continue
            if header is None:
                header = _csv_header(cells, path, error)
                continue
            if len(cells) > len(header):
                raise error(f"{path}: line {line} has more cells than the header")
            values = {name: cell.strip() for name, cell in zip(header, cells, strict=False) if name and cell.strip()}
            if values:
                records.append((line, values))
    except csv.Error as exc:
        raise error(f"{path}: cannot parse the record starting at line {start}: {exc}") from exc
    return records


def _csv_header(cells: list[str], path: Path, error: ErrorType) -> list[str]:
    """The header's column names; ``error`` when a name appears twice (one column would be lost)."""
    names = [cell.strip() for cell in cells]
    twice = sorted({name for name in names if name and names.count(name) > 1})
    if twice:
        raise error(f"{path}: the header names column {', '.join(map(repr, twice))} more than once")
    return names
