"""Aggregate judged items by each benchmark's convention, with bootstrap 95% intervals.

- **ImgEdit**: an item's score is the mean of its three axes; an edit type's score is the mean over its items; the
  overall score is the mean of the edit types' scores (ImgEdit's ``step1_get_avgscore`` / ``step2_typescore``; its
  scripts round to 2 decimals at each step, we round only for display).
- **GEdit-Bench**: per item SC = min of the two semantic scores, PQ = min of the two quality scores, O = sqrt(SC*PQ);
  per task group the means of SC, PQ and O; per language the same over that language's items; overall (SC, PQ, O)
  the mean over the groups.
- **Generic** (PBench-Edit): an item's score is the mean of its three axes; a category's score the mean over its
  items; the overall score the mean over all items, as PBench-Edit reports it.

Items the judge failed on are counted and left out. Intervals come from a bootstrap over items within each category.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .items import GEDIT, GENERIC, IMGEDIT
from .stats import bootstrap_ci, macro_mean, mean, pooled_mean

CONVENTIONS = {
    IMGEDIT: "item = mean of its 3 axes; edit type = mean of its items; overall = mean of the edit types",
    GEDIT: "item SC = min of 2, PQ = min of 2, O = sqrt(SC*PQ); group = mean of its items; overall = mean of groups",
    GENERIC: "item = mean of its 3 axes (1-5); category = mean of its items; overall = mean of all items",
}


@dataclass(frozen=True)
class Scored:
    """One item's judged result for aggregation."""

    id: str
    category: str
    language: str
    axes: dict[str, float]
    score: float


@dataclass
class Aggregate:
    """A benchmark's scores: overall (with its interval), per category, per axis, per language (GEdit)."""

    overall: float | None
    overall_ci: tuple[float, float] | None
    categories: dict[str, dict[str, Any]] = field(default_factory=dict)
    axes: dict[str, float | None] = field(default_factory=dict)
    languages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"overall": self.overall, "overall_ci": list(self.overall_ci) if self.overall_ci else None,
                "categories": {name: c["score"] for name, c in self.categories.items()},
                "category_details": self.categories, "axes": self.axes, "languages": self.languages}  # fmt: skip


def _by_category(items: Sequence[Scored]) -> dict[str, list[Scored]]:
    groups: dict[str, list[Scored]] = defaultdict(list)
    for item in items:
        groups[item.category].append(item)
    return dict(sorted(groups.items()))


def _category(items: list[Scored], samples: int, value: str = "score") -> dict[str, Any]:
    values = [item.score if value == "score" else item.axes[value] for item in items]
    axes = sorted({axis for item in items for axis in item.axes})
    return {"score": mean(values), "ci": _list(bootstrap_ci([values], pooled_mean, samples)), "n": len(items),
            "axes": {axis: mean([item.axes[axis] for item in items if axis in item.axes]) for axis in axes}}


def _list(ci: tuple[float, float] | None) -> list[float] | None:
    return list(ci) if ci else None


def aggregate(fmt: str, items: Sequence[Scored], samples: int = 2000) -> Aggregate:
    """The aggregate of ``items`` (judged successfully) under ``fmt``'s convention."""
    groups = _by_category(items)
    categories = {name: _category(members, samples) for name, members in groups.items()}
    scores = [[item.score for item in members] for members in groups.values()]
    if fmt == GENERIC:
        overall = mean([item.score for item in items])
        ci = bootstrap_ci(scores, pooled_mean, samples)
    else:
        overall = mean([c["score"] for c in categories.values()])
        ci = bootstrap_ci(scores, macro_mean, samples)
    axes_names = sorted({axis for item in items for axis in item.axes})
    if fmt == GENERIC:
        axes = {axis: mean([item.axes[axis] for item in items if axis in item.axes]) for axis in axes_names}
    else:
        axes = {axis: mean([c["axes"][axis] for c in categories.values() if c["axes"].get(axis) is not None])
                for axis in axes_names}  # fmt: skip
    result = Aggregate(overall, ci, categories, axes)
    if fmt == GEDIT:
        result.languages = _languages(items, samples)
    return result


def _languages(items: Sequence[Scored], samples: int) -> dict[str, dict[str, Any]]:
    """GEdit's per-language tables: the same aggregate over each language's items."""
    languages: dict[str, list[Scored]] = defaultdict(list)
    for item in items:
        languages[item.language].append(item)
    out = {}
    for language, members in sorted(languages.items()):
        sub = aggregate(IMGEDIT, members, samples)  # the same macro rule, without recursing into languages
        out[language] = {"overall": sub.overall, "overall_ci": _list(sub.overall_ci), "axes": sub.axes,
                         "categories": {name: c["score"] for name, c in sub.categories.items()}, "n": len(members)}
    return out
