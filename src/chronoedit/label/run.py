"""Labelling a set of pairs into a dataset folder: pre-flight checks, the two VLM stages, resumable writes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .. import media
from ..enhance import PromptError
from ..errors import UserError, one_line
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
                retry_skipped: bool = False, quiet: bool = False, workers: int = 1) -> Summary:  # fmt: skip
    """Label every pair not yet in ``out_dir``; the VLM is loaded only if some pair needs it, and released at the end.

    Bad pairs (missing, unreadable, different sizes) raise PairsError naming the pair, before the VLM loads, unless
    ``skip_bad`` records them in skipped.csv. VLM failures (server down, ...) stop the run; done pairs stay done.
    ``workers`` > 1 asks about that many pairs at once (for endpoints that batch, like vLLM); rows are still written
    one at a time by this thread, and a crash loses at most the ``workers`` pairs in flight.
    """
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}", "workers")
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
                for outcome in _outcomes(vlm, pending, skip_bad, workers):
                    bar.set_postfix_str(outcome.pair.key)
                    message = _commit(outcome, dataset, summary)
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


@dataclass
class Outcome:
    """What labelling one pair gave: ``labeled`` (with prompt and images), ``no_change``, ``bad`` or ``unusable``."""

    pair: Pair
    kind: str
    prompt: str = ""
    reason: str = ""
    source: Image.Image | None = None
    target: Image.Image | None = None


def _outcomes(vlm: VLM, pending: list[Pair], skip_bad: bool, workers: int) -> Iterator[Outcome]:
    """Label the pairs one after the other, or ``workers`` at a time (yielded as they finish)."""
    if workers == 1:
        for pair in pending:
            yield _label_one(vlm, pair, skip_bad)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chronoedit-label")
    try:
        futures = [pool.submit(_label_one, vlm, pair, skip_bad) for pair in pending]
        for future in as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _label_one(vlm: VLM, pair: Pair, skip_bad: bool) -> Outcome:
    """Decode the pair and run both stages; no writing. PairsError for bad data unless ``skip_bad``."""
    try:
        source, target = media.load_image(pair.source), media.load_image(pair.target)
        if source.size != target.size:  # the header check passed, so only a lying header gets here
            raise ValueError(f"source and target sizes differ ({source.size} vs {target.size})")
    except (OSError, ValueError) as exc:
        problem = f"{pair.origin}: {one_line(exc)}"
        if not skip_bad:
            raise PairsError(problem) from exc
        return Outcome(pair, "bad", reason=problem)
    try:
        instruction = pair.instruction or describe_change(vlm, source, target)
        if instruction is None:
            return Outcome(pair, "no_change")
        prompt = dense_prompt(vlm, source, target, instruction)
    except PromptError as exc:
        return Outcome(pair, "unusable", reason=str(exc))
    return Outcome(pair, "labeled", prompt=prompt, source=source, target=target)


def _commit(outcome: Outcome, dataset: LabelDataset, summary: Summary) -> str | None:
    """Write one outcome (files then row, or a skipped row); returns a message worth showing, if any."""
    pair = outcome.pair
    if outcome.kind == "labeled":
        dataset.add(pair, outcome.source, outcome.target, outcome.prompt)
        summary.labeled += 1
    elif outcome.kind == "no_change":
        dataset.skip(pair, NO_CHANGE)
        summary.no_change += 1
    elif outcome.kind == "bad":
        dataset.skip(pair, f"bad pair: {outcome.reason}")
        summary.bad += 1
        summary.problems.append(outcome.reason)
        return f"skipped {outcome.reason}"
    else:
        dataset.skip(pair, f"unusable VLM answer: {outcome.reason}")
        summary.unusable += 1
        return f"{pair.origin}: skipped, unusable VLM answer: {outcome.reason}"
    return None
