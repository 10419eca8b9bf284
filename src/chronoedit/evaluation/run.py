"""One evaluation run (or a sweep of them) from benchmark to report, in phases that never hold two models at once:

1. generate every run's edits with one loaded editing model (or take ``--outputs``), then measure the judge-free
   metrics while the model's CLIP encoder is at hand; release the model;
2. judge every item (cached replies first), then aggregate and write ``scores.csv``, ``summary.json`` and
   ``report.html`` per run.

A run folder records its generation settings in ``eval.json``; rerunning in it with other settings is refused, so a
report never mixes edits made two ways.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__, files
from ..editing import EditRunner, EditSettings, ModelSpec
from ..errors import UserError
from ..lazy import materialize
from ..vlm import VLM, VLMConfig
from . import generate as gen
from .aggregate import CONVENTIONS, Scored, aggregate
from .items import Benchmark, EvalItem
from .judge import Judge, ReplyCache, Verdict
from .metrics import ClipSimilarity, changed_fraction, psnr, ssim
from .rubrics import Rubric

RUN_FILE = "eval.json"
LOCK_NAME = ".chronoedit-eval.lock"
JUDGE_CACHE = "judge_cache.jsonl"


@dataclass(frozen=True)
class JudgeSetup:
    """The judge: its VLM, rubric, attempts per question, whether recorded failures are asked again, and the reply
    cache file (default: the run folder's ``judge_cache.jsonl``)."""

    config: VLMConfig
    rubric: Rubric
    attempts: int = 3
    retry_failed: bool = False
    cache: Path | None = None


@dataclass(frozen=True)
class EvalRun:
    """One run: the benchmark, its folder, the generation settings, images made elsewhere (``outputs``) instead of
    generating, and its sweep label (``KEY=VALUE``)."""

    benchmark: Benchmark
    out_dir: Path
    settings: EditSettings
    outputs: Path | None = None
    label: str = ""


@dataclass
class ItemResult:
    """What became of one item: its output image, status, judge verdict and metrics."""

    item: EvalItem
    output: Path | None = None
    status: str = "pending"  # ok, missing, generation_failed, judge_failed, not_judged
    error: str = ""
    verdict: Verdict | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)


def _settings_record(run: EvalRun, spec: ModelSpec | None, enhancer: VLMConfig | None) -> dict[str, Any]:
    """What decides the run's images (compared on a rerun)."""
    if run.outputs is not None:
        return {"outputs": str(run.outputs.resolve())}
    return {"settings": dataclasses.asdict(run.settings), "model_path": spec.model_path if spec else None,
            "transformer": str(spec.transformer) if spec and spec.transformer else None,
            "loras": [[str(lora.path), lora.scale] for lora in spec.loras] if spec else [],
            "enhancer": enhancer.model if enhancer else None}  # fmt: skip


def prepare(run: EvalRun, spec: ModelSpec | None, enhancer: VLMConfig | None) -> None:
    """Create the run folder and record its generation settings; UserError when it holds a run made otherwise."""
    if run.out_dir.exists() and not run.out_dir.is_dir():
        raise UserError(f"{{out}} {run.out_dir} is not a directory", "out")
    run.out_dir.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": str(run.benchmark.source.resolve()), "format": run.benchmark.format,
              "items": len(run.benchmark.items), "generation": _settings_record(run, spec, enhancer),
              "label": run.label, "chronoedit_version": __version__}  # fmt: skip
    path = run.out_dir / RUN_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("generation") not in (None, record["generation"]):
            changed = sorted(_differences(old["generation"], record["generation"]))
            raise UserError(f"{{out}} {run.out_dir} holds a run made with other settings ({', '.join(changed)} "
                            "changed): use another --out", "out")  # fmt: skip
    with files.writing(path):
        files.write_json(path, record | {"updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}".removeprefix("settings."))
    return names


def collect(run: EvalRun) -> list[ItemResult]:
    """Each item with its output image (``--outputs`` by id, or the batch's), or why there is none."""
    results = []
    folder = run.outputs if run.outputs is not None else run.out_dir / gen.OUTPUTS
    for item in run.benchmark.items:
        output = gen.find_output(item, folder, run.benchmark.format)
        result = ItemResult(item, output, "pending" if output else "missing")
        if output is None:
            failed = gen.generation_error(item, run.out_dir) if run.outputs is None else None
            result.status = "generation_failed" if failed else "missing"
            result.error = failed or f"no output image for {item.id} in {folder}"
        results.append(result)
    return results


def measure(results: list[ItemResult], clip: ClipSimilarity | None) -> None:
    """The judge-free metrics of every item with an output (unreadable images become the item's error)."""
    from ..media import load_image

    for result in results:
        if result.output is None:
            continue
        try:
            source, edited = load_image(result.item.image), load_image(result.output)
            result.metrics["changed_fraction"] = changed_fraction(source, edited)
            if clip is not None:
                result.metrics["clip_similarity"] = clip(source, edited)
            if result.item.reference is not None:
                reference = load_image(result.item.reference)
                result.metrics["psnr"], result.metrics["ssim"] = psnr(edited, reference), ssim(edited, reference)
        except UserError as exc:
            result.status, result.error, result.output = "missing", exc.render(), None


def judge_all(results: list[ItemResult], judge: Judge, quiet: bool = False) -> None:
    """Judge every item with an output; a failed verdict is recorded on the item."""
    from tqdm.auto import tqdm

    todo = [result for result in results if result.output is not None]
    for result in tqdm(todo, desc="judge", unit="item", disable=quiet, file=sys.stderr, dynamic_ncols=True):
        verdict = judge.judge(result.item, {"input": result.item.image, "output": result.output})
        result.verdict = verdict
        result.status = "ok" if verdict.ok else "judge_failed"
        result.error = "" if verdict.ok else verdict.error


def summarize(run: EvalRun, results: list[ItemResult], setup: JudgeSetup | None,
              samples: int = 2000) -> dict[str, Any]:  # fmt: skip
    """The run's ``summary.json`` content."""
    from .stats import mean

    scored = [Scored(r.item.id, r.item.category, r.item.language, r.verdict.score.axes, r.verdict.score.score)
              for r in results if r.verdict is not None and r.verdict.ok and r.verdict.score]  # fmt: skip
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    metric_names = sorted({name for r in results for name in r.metrics})
    summary: dict[str, Any] = {
        "benchmark": str(run.benchmark.source), "format": run.benchmark.format, "label": run.label,
        "items": len(results), "judged": len(scored), "counts": counts,
        "judge_model": setup.config.model if setup else None, "rubric": setup.rubric.name if setup else None,
        "rubric_digest": setup.rubric.digest if setup else None,
        "convention": CONVENTIONS[run.benchmark.format] if setup else None,
        "metrics": {name: mean([v for r in results if (v := r.metrics.get(name)) is not None and v != float("inf")])
                    for name in metric_names},
        "settings": _settings_record(run, None, None), "chronoedit_version": __version__,
    }  # fmt: skip
    if setup is not None:
        summary |= aggregate(run.benchmark.format, scored, samples).as_dict()
    else:
        summary |= {"overall": None, "categories": {}}
    return summary


def evaluate(runs: list[EvalRun], spec: ModelSpec | None, judge: JudgeSetup | None, *,
             runner: Callable[[], EditRunner] | None = None, enhancer: VLMConfig | None = None,
             open_vlm: Callable[[VLMConfig], VLM] | None = None, clip: bool = True, samples: int = 2000,
             quiet: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Generate (or collect), measure, judge and report every run; their summaries. See the module docstring."""
    from .report import write_run_files

    open_vlm = open_vlm or _load_vlm
    with _locks([run.out_dir for run in runs]):
        for run in runs:
            prepare(run, spec, enhancer)
        editor = _generate_all(runs, spec, runner, enhancer, open_vlm, quiet)
        collected = [collect(run) for run in runs]
        similarity = _clip(editor, spec, clip)
        for results in collected:
            measure(results, similarity)
        del editor, similarity  # the editing model goes before the judge loads
        summaries = []
        for run, results in zip(runs, collected, strict=True):
            if judge is not None:
                judge.rubric.check([r.item for r in results])
                cache = ReplyCache(judge.cache or run.out_dir / JUDGE_CACHE)
                with Judge(judge.rubric, lambda: open_vlm(judge.config), judge.config.model, cache,
                           judge.attempts, judge.retry_failed) as j:  # fmt: skip
                    judge_all(results, j, quiet)
            else:
                for result in results:
                    result.status = "not_judged" if result.output is not None else result.status
            summary = summarize(run, results, judge, samples)
            write_run_files(run.out_dir, summary, results)
            summaries.append(summary)
    return summaries


def _locks(folders: list[Path]) -> Any:
    import contextlib

    stack = contextlib.ExitStack()
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        stack.enter_context(files.locked(folder / LOCK_NAME, f"another chronoedit eval is writing to {folder}"))
    return stack


def _generate_all(runs: list[EvalRun], spec: ModelSpec | None, runner: Callable[[], EditRunner] | None,
                  enhancer: VLMConfig | None, open_vlm: Callable[[VLMConfig], VLM],
                  quiet: bool) -> EditRunner | None:  # fmt: skip
    """Generate the runs that need it on one editing model; the runner (None when nothing was generated)."""
    todo = [run for run in runs if run.outputs is None]
    if not todo:
        return None
    if spec is None:
        raise ValueError("generating needs a model spec")  # a bug in the front end
    prompts = None
    if enhancer is not None:  # the enhancer VLM comes and goes before the editing model loads
        prompts = gen.enhanced_prompts(todo[0].benchmark, todo[0].out_dir, enhancer, open_vlm, quiet)
    editor = runner() if runner is not None else EditRunner(spec)
    for run in todo:
        if not quiet and run.label:
            print(f"chronoedit: eval run {run.label}", file=sys.stderr, flush=True)
        summary = gen.generate(run.benchmark, run.out_dir, spec, run.settings, editor, prompts, quiet)
        if not quiet:
            print(f"chronoedit: {summary.line(run.out_dir / gen.OUTPUTS)}", file=sys.stderr, flush=True)
    return editor


def _clip(editor: EditRunner | None, spec: ModelSpec | None, wanted: bool) -> ClipSimilarity | None:
    """The checkpoint's CLIP image encoder: the loaded pipeline's, else loaded from the checkpoint folder."""
    if not wanted or spec is None:
        return None
    pipe = editor.pipe if editor is not None else None
    if pipe is not None and getattr(pipe, "image_encoder", None) is not None:
        encoder = materialize(pipe.image_encoder)  # kept for the run, also in low-memory mode
        return ClipSimilarity(encoder, pipe.image_processor, f"{spec.model_path} image_encoder")
    from ..editing import checkpoint_path

    folder = Path(checkpoint_path(spec))
    if not (folder / "image_encoder").is_dir():
        return None
    return ClipSimilarity.from_checkpoint(folder)


def _load_vlm(config: VLMConfig) -> VLM:
    from ..vlm import load_vlm

    return load_vlm(config)
