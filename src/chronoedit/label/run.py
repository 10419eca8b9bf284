"""Labelling a set of pairs into a dataset folder: pre-flight checks, the two VLM stages, resumable writes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import io as cio
from ..enhance import PromptError
from ..vlm import VLM
from .dataset import LabelDataset, open_dataset
from .pairs import Pair, PairsError, check_pair
from .prompts import dense_prompt, describe_change

NO_CHANGE = "no change"


@dataclass
class Summary:
    """What one labelling run did."""

    labeled: int = 0
    no_change: int = 0
    bad: int = 0
    unusable: int = 0
    already_done: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self, out_dir: Path) -> str:
        """One line for the end of ``chronoedit label``."""
        parts = [f"{self.labeled} labeled", f"{self.no_change} filtered as no change"]
        if self.bad:
            parts.append(f"{self.bad} bad pairs skipped")
        if self.unusable:
            parts.append(f"{self.unusable} unusable VLM answers skipped")
        parts.append(f"{self.already_done} already done")
        return f"label: {', '.join(parts)} (dataset in {out_dir}; skipped pairs in skipped.csv)"


def label_pairs(pairs: list[Pair], out_dir: str | Path, load_vlm: Callable[[], VLM], *, skip_bad: bool = False,
                retry_skipped: bool = False, quiet: bool = False) -> Summary:  # fmt: skip
    """Label every pair not yet in ``out_dir``; the VLM is loaded only if some pair needs it, and released at the end.

    Bad pairs (missing, unreadable, different sizes) raise PairsError naming the pair, before the VLM loads, unless
    ``skip_bad`` records them in skipped.csv. VLM failures (server down, ...) stop the run; done pairs stay done.
    """
    out_dir = Path(out_dir)
    summary = Summary()
    with open_dataset(out_dir, retry_skipped=retry_skipped) as dataset:
        pending = [pair for pair in pairs if not dataset.has(pair.key)]
        summary.already_done = len(pairs) - len(pending)
        pending = _preflight(pending, dataset, summary, skip_bad)
        if not pending:
            return summary
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), initial=len(pairs) - len(pending), desc="label", unit="pair", disable=quiet,
                   file=sys.stderr, dynamic_ncols=True)  # fmt: skip
        try:
            with load_vlm() as vlm:
                for pair in pending:
                    bar.set_postfix_str(pair.key)
                    message = _label_one(vlm, pair, dataset, summary, skip_bad)
                    if message and not quiet:
                        bar.write(f"chronoedit: {message}", file=sys.stderr)
                    bar.update(1)
        finally:
            bar.close()
    return summary


def _preflight(pending: list[Pair], dataset: LabelDataset, summary: Summary, skip_bad: bool) -> list[Pair]:
    """Pairs that pass the header checks; bad ones raise (first one named, with the count) or are recorded."""
    problems = {pair.key: problem for pair in pending if (problem := check_pair(pair)) is not None}
    if problems and not skip_bad:
        first = next(iter(problems.values()))
        more = f" (and {len(problems) - 1} more bad pairs; --skip-bad-pairs records and skips them)"
        raise PairsError(first + (more if len(problems) > 1 else ""))
    for pair in pending:
        if pair.key in problems:
            dataset.skip(pair, f"bad pair: {problems[pair.key]}")
            summary.bad += 1
            summary.problems.append(problems[pair.key])
    return [pair for pair in pending if pair.key not in problems]


def _label_one(vlm: VLM, pair: Pair, dataset: LabelDataset, summary: Summary, skip_bad: bool) -> str | None:
    """Label one pair (or record why not); returns a message worth showing, if any."""
    try:
        source, target = cio.load_image(pair.source), cio.load_image(pair.target)
        if source.size != target.size:  # the header check passed, so only a lying header gets here
            raise ValueError(f"source and target sizes differ ({source.size} vs {target.size})")
    except (OSError, ValueError) as exc:
        problem = f"{pair.origin}: {' '.join(str(exc).split())}"
        if not skip_bad:
            raise PairsError(problem) from exc
        dataset.skip(pair, f"bad pair: {problem}")
        summary.bad += 1
        return f"skipped {problem}"
    try:
        instruction = pair.instruction or describe_change(vlm, source, target)
        if instruction is None:
            dataset.skip(pair, NO_CHANGE)
            summary.no_change += 1
            return None
        prompt = dense_prompt(vlm, source, target, instruction)
    except PromptError as exc:
        dataset.skip(pair, f"unusable VLM answer: {exc}")
        summary.unusable += 1
        return f"{pair.origin}: skipped, unusable VLM answer: {exc}"
    dataset.add(pair, source, target, prompt)
    summary.labeled += 1
    return None
