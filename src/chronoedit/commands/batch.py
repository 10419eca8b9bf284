"""``chronoedit batch``: many edits from a JSONL or CSV manifest, with the model loaded once.

Rows are written as ``DIR/<id>.<fmt>`` plus a JSON sidecar ``DIR/<id>.json``; reruns skip finished rows. Exit code 0
when every row succeeded, 1 when some row failed (each has ``DIR/<id>.error.json``), 2 for a bad manifest or bad flags.
See :mod:`chronoedit.batch`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..editing import resolve_sampling
from ..media import OUTPUT_FORMATS
from .edit import console_report
from .flags import add_lora_args, add_reasoning_args, add_runtime_args, add_sampling_args, edit_settings, model_spec

EPILOG = """\
manifest: JSONL (one JSON object a line) or CSV (.csv, with a header row). Fields: input (or image), prompt, and
optionally id, seed, num_inference_steps, guidance_scale, enable_temporal_reasoning, num_temporal_reasoning_steps,
num_frames, height, width, max_area, output_format (png/jpg/webp), negative_prompt, preset (distill, upscale,
paint-brush: its LoRAs are loaded once and switched per row). Relative input paths are relative
to the manifest's folder; the id defaults to the input file's name without suffix. Row values override the flags.

outputs: DIR/<id>.<fmt> (written atomically), then DIR/<id>.json with the exact settings used. A row is done when
both exist and the sidecar parses; a rerun skips done rows and redoes the rest, so a killed batch can simply be rerun.
A failed row is recorded in DIR/<id>.error.json and the batch goes on.

exit codes: 0 all rows done or skipped, 1 some row failed, 2 bad manifest or flags (nothing run)."""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``batch`` subcommand; the parsed arguments carry :func:`handle` as ``handler``."""
    parser = subparsers.add_parser(
        "batch",
        help="run many edits from a JSONL or CSV manifest (resumable)",
        description="Run one edit per manifest row with the model loaded once. Flags set every row's defaults.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("manifest", type=Path, help="JSONL or CSV manifest, one edit a row")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created if needed)")
    parser.add_argument("--output-format", default="png", choices=sorted(OUTPUT_FORMATS), metavar="FMT",
                        help="png, jpg or webp for rows that do not say (png)")
    parser.add_argument("--negative-prompt", metavar="TEXT", default=None, help="negative prompt (default: empty)")
    add_sampling_args(parser)
    add_reasoning_args(parser, "temporal reasoning (defaults for every row)", "every row")
    add_runtime_args(parser)
    add_lora_args(parser)
    parser.set_defaults(handler=handle)
    return parser


def handle(args: argparse.Namespace) -> int:
    """Check the flags (before anything loads), run the batch and print its summary line; 0 when no row failed,
    else 1."""
    from ..batch import Batch, run_batch
    from ..editing import EditRunner

    spec = model_spec(args)
    defaults = edit_settings(args)
    resolve_sampling(defaults, spec)  # every row's defaults, checked once
    if args.offload_model and spec.device == "cpu":
        console_report(args.quiet).note("--offload_model has no effect on the CPU")
    batch = Batch(manifest=args.manifest, out_dir=args.out, model=spec, defaults=defaults,
                  output_format=OUTPUT_FORMATS[args.output_format])  # fmt: skip
    report = console_report(quiet=True)  # notes only: the batch's progress bar says the rest
    summary = run_batch(batch, quiet=args.quiet, runner=EditRunner(spec, report=report))
    print(summary.line(args.out), flush=True)
    return summary.exit_code
