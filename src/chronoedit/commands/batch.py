"""``chronoedit batch``: many edits from a JSONL or CSV manifest, with the model loaded once.

Rows are written as ``DIR/<id>.<fmt>`` plus a JSON sidecar ``DIR/<id>.json``; reruns skip finished rows. Exit code 0
when every row succeeded, 1 when some row failed (each has ``DIR/<id>.error.json``), 2 for a bad manifest or bad flags.
See :mod:`chronoedit.batch`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..devices import default_dtype
from ..editing import ModelSpec, resolve_sampling
from ..errors import UserError
from ..media import OUTPUT_FORMATS
from ..parallel.ranks import Ranks, from_env
from .edit import console_report
from .flags import (
    add_lora_args,
    add_parallel_args,
    add_reasoning_args,
    add_runtime_args,
    add_sampling_args,
    edit_settings,
    model_spec,
)

if TYPE_CHECKING:
    from ..batch import Summary

EPILOG = """\
manifest: JSONL (one JSON object a line) or CSV (.csv, with a header row). Fields: input (or image), prompt, and
optionally id, seed, num_inference_steps, guidance_scale, enable_temporal_reasoning, num_temporal_reasoning_steps,
num_frames, height, width, max_area, output_format (png/jpg/webp), negative_prompt, preset (distill, upscale,
paint-brush: its LoRAs are loaded once and switched per row). Relative input paths are relative
to the manifest's folder; the id defaults to the input file's name without suffix. Row values override the flags.

outputs: DIR/<id>.<fmt> (written atomically), then DIR/<id>.json with the exact settings used. A row is done when
both exist and the sidecar parses; a rerun skips done rows and redoes the rest, so a killed batch can simply be rerun.
A failed row is recorded in DIR/<id>.error.json and the batch goes on.

parallel: `torchrun --nproc_per_node=N -m chronoedit batch ...` runs the rows over N processes (one model each, on
cuda:<local rank> with a GPU); `--ray ADDRESS|auto|local --workers K` runs them on K Ray actors. Same outputs and
resume rules; the output folder must be shared by every process.

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
                        help="png, jpg or webp for rows that do not say (png)")  # fmt: skip
    parser.add_argument("--negative-prompt", metavar="TEXT", default=None, help="negative prompt (default: empty)")
    add_sampling_args(parser)
    add_reasoning_args(parser, "temporal reasoning (defaults for every row)", "every row")
    add_runtime_args(parser)
    add_lora_args(parser)
    add_parallel_args(parser, switch="run each row over all processes of the torchrun (its token sequence split "
                      "over them, rank 0 writes) instead of giving each process its own rows: for rows too large for "
                      "one device")
    _add_ray_args(parser)
    parser.set_defaults(handler=handle)
    return parser


def _add_ray_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray cluster (pip install 'chronoedit[ray]')")
    group.add_argument("--ray", metavar="ADDRESS", default=None,
                       help="run the rows on a Ray cluster: its address, auto (the cluster this machine is in) or "
                       "local (a Ray instance started here for this batch)")  # fmt: skip
    group.add_argument("--workers", type=int, metavar="K", default=None,
                       help="Ray actors, each with its own model (with --ray)")  # fmt: skip
    group.add_argument("--gpus-per-worker", type=float, metavar="G", default=None,
                       help="GPUs per Ray actor (default 0: CPU actors; each runs on its own GPU as cuda)")  # fmt: skip


def check_parallel_flags(args: argparse.Namespace, ranks: Ranks) -> None:
    """One-line errors for flag combinations that cannot run (before anything loads)."""
    if args.ray is None:
        for name in ("workers", "gpus_per_worker"):
            if getattr(args, name) is not None:
                raise UserError(f"{{{name}}} needs {{ray}} (Ray actors)", name, also=("ray",))
        return
    if ranks.distributed:
        raise UserError(f"{{ray}} starts its own workers: run it as one process, not under torchrun (world size "
                        f"{ranks.world})", "ray")  # fmt: skip
    if args.workers is None or args.workers < 1:
        raise UserError("{ray} needs {workers} K, the number of Ray actors (at least 1)", "ray", also=("workers",))
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise UserError(f"{{gpus_per_worker}} must be 0 or more, got {args.gpus_per_worker:g}", "gpus_per_worker")
    if (args.gpus_per_worker or 0) > 0 and args.device not in (None, "cuda"):
        raise UserError("with {gpus_per_worker} each Ray actor runs on the GPUs Ray gives it: leave out {device}",
                        "gpus_per_worker", also=("device",))  # fmt: skip
    if not args.gpus_per_worker and args.device not in (None, "cpu"):
        raise UserError(f"Ray actors without GPUs run on the CPU: {{device}} {args.device} needs {{gpus_per_worker}}",
                        "device", also=("gpus_per_worker",))  # fmt: skip


def handle(args: argparse.Namespace) -> int:
    """Check the flags (before anything loads), run the batch (one process, the ranks of a torchrun or a Ray cluster)
    and print its summary line; 0 when no row failed, else 1. Under torchrun only rank 0 prints, and a user error on
    another rank is left to rank 0 to say (exit code 2 on every rank)."""
    ranks = from_env()

    def announce(summary: Summary) -> None:
        print(summary.line(args.out), flush=True)

    summary = _run(args, ranks, announce)
    if not ranks.distributed:
        announce(summary)
    return summary.exit_code


def _run(args: argparse.Namespace, ranks: Ranks, announce: Callable[[Summary], None]) -> Summary:
    from ..batch import Batch, run_batch
    from ..editing import EditRunner

    check_parallel_flags(args, ranks)
    spec = _model_spec(args)
    defaults = edit_settings(args)
    resolve_sampling(defaults, spec)  # every row's defaults, checked once
    if args.offload_model and spec.device == "cpu" and ranks.is_main:
        console_report(args.quiet).note("--offload_model has no effect on the CPU")
    batch = Batch(manifest=args.manifest, out_dir=args.out, model=spec, defaults=defaults,
                  output_format=OUTPUT_FORMATS[args.output_format])  # fmt: skip
    report = console_report(quiet=True)  # notes only: the batch's progress bar says the rest
    if args.ray is not None:
        from ..batch_ray import Cluster, run_batch_ray

        cluster = Cluster(address=args.ray, workers=args.workers, gpus_per_worker=args.gpus_per_worker or 0.0)
        return run_batch_ray(batch, cluster, quiet=args.quiet)
    if ranks.distributed:
        from ..batch_ranks import run_batch_ranks

        return run_batch_ranks(batch, ranks, lambda model: EditRunner(model, report=report), quiet=args.quiet,
                               announce=announce)  # fmt: skip
    return run_batch(batch, quiet=args.quiet, runner=EditRunner(spec, report=report))


def _model_spec(args: argparse.Namespace) -> ModelSpec:
    """The flags' model; on Ray, resolved for the actors' devices (the CPU, or the GPUs Ray gives each: cuda), not
    this machine's."""
    if args.ray is None:
        return model_spec(args)
    spec = model_spec(argparse.Namespace(**{**vars(args), "device": "cpu"}))  # checked here, on the CPU
    if not args.gpus_per_worker:
        return spec
    return dataclasses.replace(spec, device="cuda", dtype=args.dtype or default_dtype("cuda", spec.is_demo),
                               offload_model=bool(args.offload_model))  # fmt: skip
