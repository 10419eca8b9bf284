"""``chronoedit label``: caption before/after image pairs with a VLM into a ChronoEdit training dataset.

See :mod:`chronoedit.label` for the stages and the dataset layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from ..vlm.cli import add_vlm_args, vlm_config_from_args

EPILOG = """\
pairs (PAIRS_DIR_OR_CSV):
  a folder with source/NAME.png + target/NAME.png (matched by name), or NAME_source.png + NAME_target.png
  (also _src/_tgt, _before/_after; png, jpg, jpeg, webp), or a CSV with a header and the columns source,target
  (optional key, instruction; paths relative to the CSV). Source and target must have the same size: they become the
  two frames of one video. Missing, unreadable or mismatched pairs are an error naming the pair, before the VLM
  loads, unless --skip-bad-pairs records them in skipped.csv.

stages:
  1. the VLM writes the editing instruction from the two images (up to 3 changes joined by ';'), or "no change"
     (such pairs are filtered out); skipped when the CSV gives an instruction.
  2. the VLM rewrites it into ChronoEdit's 80-100 word "The user wants to ..." prompt.
  Each request carries both images (serve vLLM with --limit-mm-per-prompt '{"image": 2}').

dataset (--out DIR):
  metadata.csv (key,video,prompt,source_image,target_image; paths relative to DIR), videos/KEY.mp4 (2 frames),
  images/KEY_source.png and KEY_target.png, skipped.csv (key,source,target,reason). Each pair is written then its
  row appended and synced: a killed run loses at most the pair in flight, and a rerun skips every pair already in
  metadata.csv or skipped.csv (--retry-skipped labels the skipped ones again).

examples:
  chronoedit label pairs/ --out dataset/ --vlm-model Qwen/Qwen2.5-VL-7B-Instruct
  chronoedit label pairs.csv --out dataset/ --vlm-base-url http://localhost:8000/v1 \\
      --vlm-model Qwen/Qwen3-VL-8B-Instruct"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``label`` subcommand; the parsed arguments carry :func:`handle` as ``handler``."""
    parser = subparsers.add_parser(
        "label",
        help="caption before/after image pairs with a VLM into a training dataset (resumable)",
        description="Label image pairs in two VLM stages (instruction, then the dense 'The user wants to ...' "
        "prompt) and write a ChronoEdit/DiffSynth dataset folder with metadata.csv.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("pairs", type=Path, metavar="PAIRS_DIR_OR_CSV", help="a folder of pairs or a CSV of pairs")
    parser.add_argument("--out", type=Path, required=True, metavar="DATASET_DIR", help="dataset folder (created)")
    parser.add_argument("--skip-bad-pairs", action="store_true",
                        help="record missing, unreadable or mismatched pairs in skipped.csv and go on")  # fmt: skip
    parser.add_argument(
        "--retry-skipped",
        action="store_true",
        help="label the pairs recorded in skipped.csv again (no change, bad or unusable)",
    )
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="with --vlm-base-url, ask about N pairs at once (servers like vLLM batch them; a crash "
                        "then loses at most the N pairs in flight) (1)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    add_vlm_args(parser)
    parser.set_defaults(handler=handle)
    return parser


def handle(args: argparse.Namespace) -> int:
    """Read and check the pairs, label what is not done yet, print the summary line."""
    from ..label import label_pairs, read_pairs
    from ..vlm import load_vlm

    config = vlm_config_from_args(args)
    if args.workers != 1 and not config.base_url:
        raise UserError("--workers needs --vlm-base-url: a local VLM answers one request at a time", "workers",
                        ("vlm_base_url",))  # fmt: skip
    pairs = read_pairs(args.pairs)
    if not args.quiet:
        where = f"at {config.base_url}" if config.base_url else "(local)"
        print(f"chronoedit: labelling {len(pairs)} pairs with {config.model} {where}", file=sys.stderr, flush=True)
    summary = label_pairs(pairs, args.out, lambda: load_vlm(config), skip_bad=args.skip_bad_pairs,
                          retry_skipped=args.retry_skipped, quiet=args.quiet, workers=args.workers)  # fmt: skip
    print(summary.line(args.out), flush=True)
    return 0
