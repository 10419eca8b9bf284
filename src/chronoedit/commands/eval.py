"""``chronoedit eval``: benchmark edits with a VLM judge, judge-free metrics and a report; ``chronoedit eval compare
RUN_A RUN_B``: paired comparison of two runs. See :mod:`chronoedit.evaluation`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ..errors import UserError
from ..vlm.cli import add_vlm_args, vlm_config_from_args
from .enhance import add_enhancer_args, enhancer_config
from .flags import add_lora_args, add_reasoning_args, add_runtime_args, add_sampling_args, edit_settings, model_spec

USAGE = "chronoedit eval BENCH --out DIR [options]\n       chronoedit eval compare RUN_A RUN_B [--out FILE]"
EPILOG = """\
benchmarks (BENCH, format detected or --format):
  imgedit  ImgEdit-Basic's basic_edit.json ({key: {id, prompt, edit_type}}) with its image folder (--images, default
           the JSON's folder); judged with its per-edit-type prompts (--judge-prompts: the JSON its basic_bench.py
           reads), "Axis: n" lines 1-5. Item = mean of 3; edit type = mean of items; overall = mean of edit types.
  gedit    GEdit-Bench's Parquet files (a file or folder; needs pyarrow) or a JSONL/JSON/CSV export with key, task_type,
           instruction, instruction_language, input_image (path); judged with VIEScore's prompts (--judge-prompts:
           its vie_prompts.py, read not run, or JSON {"SC": ..., "PQ": ...}). SC = min of 2, PQ = min of 2,
           O = sqrt(SC*PQ) (0-10); per task group, per language; overall = mean of groups.
  generic  JSONL/CSV with id, image, prompt, optional category, reference (paths relative to the file); judged on
           PBench-Edit's axes (action_fidelity, identity_preservation, visual_coherence, 1-5) with our rubric.

outputs (--out DIR): outputs/ (the edits, through the batch engine: resumable, settings in sidecars, fixed seeds),
  judge_cache.jsonl (every reply; a rerun asks nothing twice), scores.csv, summary.json, report.html (+ report_files/).
  --outputs DIR judges images made elsewhere instead, matched by id (ID.png/.jpg/.webp; for GEdit also
  [fullset/]GROUP/LANGUAGE/KEY.png). The judge always sees the benchmark's own instruction.

examples:
  chronoedit eval pbench.jsonl --out runs/base --vlm-base-url http://localhost:8000/v1 --vlm-model MODEL
  chronoedit eval basic_edit.json --images ImgEdit/singleturn --judge-prompts prompts.json --out runs/imgedit ...
  chronoedit eval pbench.jsonl --out runs/nr --enable-temporal-reasoning --sweep num_temporal_reasoning_steps=0,10,50
  chronoedit eval compare runs/base runs/lora

exit codes: 0 every item judged, 1 some item failed (generation or judge; named in scores.csv), 2 bad input."""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand; the parsed arguments carry :func:`handle` as ``handler``."""
    parser = subparsers.add_parser(
        "eval", usage=USAGE, help="benchmark edits with a VLM judge and metrics; compare runs",
        description="Run (or take) edits on a benchmark, judge them with a VLM, add judge-free metrics, aggregate "
        "by the benchmark's convention with bootstrap 95% intervals and write a report.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("bench", metavar="BENCH", help="benchmark file or folder, or 'compare'")
    parser.add_argument("runs", nargs="*", metavar="RUN", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, metavar="DIR", help="run folder (created; compare: a JSON file)")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--format", choices=("imgedit", "gedit", "generic"), help="benchmark format (detected)")
    group.add_argument("--images", type=Path, metavar="DIR", help="ImgEdit's image folder (default: the JSON's)")
    group.add_argument("--limit", type=int, metavar="N", help="only the first N items")
    group.add_argument("--outputs", type=Path, metavar="DIR", help="judge these images (by id) instead of editing")
    group.add_argument("--sweep", metavar="KEY=V1,V2", help="one run per value of an edit setting, into OUT/KEY=V")
    judge = parser.add_argument_group("judge (a vision-language model; --vlm-* flags below)")
    judge.add_argument("--judge-prompts", type=Path, metavar="FILE", help="the benchmark's published judge prompts")
    judge.add_argument("--no-judge", action="store_true", help="metrics only")
    judge.add_argument("--judge-attempts", type=int, default=3, metavar="N",
                       help="asks per question before an unusable reply is recorded as a failure (3)")
    judge.add_argument("--judge-retry-failed", action="store_true", help="ask again where failures were recorded")
    judge.add_argument("--judge-cache", type=Path, metavar="FILE", help="reply cache (OUT/judge_cache.jsonl)")
    judge.add_argument("--no-clip", action="store_true", help="skip the CLIP similarity (needs the checkpoint)")
    judge.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="bootstrap resamples (2000)")
    add_vlm_args(parser, group=judge)
    add_sampling_args(parser)
    add_reasoning_args(parser, what="every item")
    add_runtime_args(parser)
    add_lora_args(parser)
    add_enhancer_args(parser)
    parser.set_defaults(handler=handle)
    return parser


def handle(args: argparse.Namespace) -> int:
    """``eval compare`` or an evaluation run (or sweep)."""
    if args.bench == "compare":
        return _compare(args)
    if args.runs:
        raise UserError(f"unexpected argument {args.runs[0]!r} (one BENCH; or: chronoedit eval compare A B)")
    if args.out is None:
        raise UserError("{out} is required: the run folder", "out")
    return _evaluate(args)


def _compare(args: argparse.Namespace) -> int:
    from .. import files
    from ..evaluation.compare import compare_runs, format_comparison

    if len(args.runs) != 2:
        raise UserError("compare needs two run folders: chronoedit eval compare RUN_A RUN_B")
    result = compare_runs(Path(args.runs[0]), Path(args.runs[1]), args.bootstrap)
    print(format_comparison(result), flush=True)
    if args.out is not None:
        files.write_json(args.out, result)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ..editing import EditRunner, resolve_sampling
    from ..evaluation import EvalRun, JudgeSetup, evaluate, load_rubric, read_benchmark
    from ..evaluation.sweep import parse_sweep, sweep_runs
    from .edit import console_report

    sweep = parse_sweep(args.sweep) if args.sweep else None
    if args.limit is not None and args.limit < 1:
        raise UserError("{limit} must be at least 1", "limit")
    benchmark = read_benchmark(args.bench, args.format, args.images, args.out / "inputs").limited(args.limit)
    setup = None
    if not args.no_judge:
        rubric = load_rubric(benchmark.format, args.judge_prompts)
        rubric.check(benchmark.items)
        setup = JudgeSetup(vlm_config_from_args(args), rubric, args.judge_attempts, args.judge_retry_failed,
                           args.judge_cache)  # fmt: skip
    enhancer = enhancer_config(args)
    explicit_model = args.model_path is not None or os.environ.get("CHRONOEDIT_MODEL_PATH")
    spec = model_spec(args) if args.outputs is None or explicit_model else None
    settings = dataclasses.replace(edit_settings(args), enhance_prompt=False)  # prompts are enhanced before the batch
    if sweep:
        runs = sweep_runs(benchmark, args.out, settings, *sweep, outputs=args.outputs)
    else:
        runs = [EvalRun(benchmark, args.out, settings, args.outputs)]
    if spec is not None and args.outputs is None:
        for run in runs:
            resolve_sampling(run.settings, spec)  # every run's settings checked before anything loads
    summaries = evaluate(runs, spec, setup, runner=lambda: EditRunner(spec, report=console_report(quiet=True)),
                         enhancer=enhancer, clip=not args.no_clip, samples=args.bootstrap,
                         quiet=args.quiet)  # fmt: skip
    for run, summary in zip(runs, summaries, strict=True):
        print(_line(run.out_dir, summary), flush=True)
    if sweep:
        _write_sweep(args.out, sweep[0], runs, summaries, args.bootstrap)
    failed = sum(n for s in summaries for status, n in s["counts"].items() if status not in ("ok", "not_judged"))
    return 1 if failed else 0


def _line(out_dir: Path, summary: dict) -> str:
    ci = summary.get("overall_ci")
    score = "not judged" if summary.get("overall") is None else f"overall {summary['overall']:.3f}" + (
        f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")  # fmt: skip
    problems = {k: v for k, v in summary["counts"].items() if k not in ("ok", "not_judged")}
    failed = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in problems.items()) or "none failed"
    return f"eval: {score} over {summary['judged']} of {summary['items']} items ({failed}): {out_dir / 'report.html'}"


def _write_sweep(out_dir: Path, key: str, runs: list, summaries: list[dict], samples: int) -> None:
    import csv
    import io

    from .. import files
    from ..evaluation.compare import format_sweep, sweep_table

    labels = [run.label.split("=", 1)[1] for run in runs]
    rows = sweep_table(key, labels, summaries, [run.out_dir for run in runs], samples)
    files.write_json(out_dir / "sweep.json", {"key": key, "rows": rows})
    buffer = io.StringIO()
    categories = sorted({c for row in rows for c in (row.get("categories") or {})})
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([key, "overall", "ci_low", "ci_high", "judged", *categories, "diff_vs_first", "sign_p"])
    for row in rows:
        ci, versus = row.get("overall_ci") or [None, None], row.get("vs_first") or {}
        writer.writerow([row[key], row["overall"], *ci, row["judged"], *[row["categories"].get(c) for c in categories],
                         versus.get("mean_diff"), versus.get("sign_p")])  # fmt: skip
    files.save_text(buffer.getvalue(), out_dir / "sweep.csv")
    print(format_sweep(key, rows), flush=True)
    print(f"eval: sweep table in {out_dir / 'sweep.csv'} and {out_dir / 'sweep.json'}", file=sys.stderr, flush=True)
