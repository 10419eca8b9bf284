"""What a benchmark is made of: its items (one input image and one instruction each) and its format, which decides
the judge's rubric and how scores are aggregated."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMGEDIT = "imgedit"
GEDIT = "gedit"
GENERIC = "generic"
FORMATS = (IMGEDIT, GEDIT, GENERIC)
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # the batch engine's ids (file names)


@dataclass(frozen=True)
class EvalItem:
    """One benchmark item: its id (a file name stem), input image, the benchmark's own instruction (what the judge
    sees), its category (ImgEdit edit type, GEdit task group, or the generic ``category``), language and optional
    reference image."""

    id: str
    image: Path
    instruction: str
    category: str = "all"
    language: str = "en"
    reference: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark read from local files: its format (:data:`FORMATS`), where it came from and its items."""

    format: str
    source: Path
    items: tuple[EvalItem, ...]

    def by_id(self) -> dict[str, EvalItem]:
        return {item.id: item for item in self.items}

    def limited(self, count: int | None) -> Benchmark:
        """The first ``count`` items (all when None)."""
        if count is None:
            return self
        return Benchmark(self.format, self.source, self.items[:count])
