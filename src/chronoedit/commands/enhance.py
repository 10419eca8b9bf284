"""``chronoedit enhance``: rewrite an edit instruction into ChronoEdit's dense prompt with a VLM, and print it.

The same enhancer runs inside ``chronoedit edit --use-prompt-enhancer``; see :mod:`chronoedit.enhance`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import files, media
from ..errors import UserError
from ..vlm.base import VLMConfig
from ..vlm.cli import add_vlm_args, vlm_config_from_args

EPILOG = """\
examples:
  chronoedit enhance -i cup.png -p "put a red hat on the cup"
  chronoedit enhance -i cup.png -p "..." --vlm-model Qwen/Qwen2.5-VL-7B-Instruct --vlm-device cuda
  chronoedit enhance -i cup.png -p "..." --vlm-base-url http://localhost:8000/v1 --vlm-model Qwen/Qwen3-VL-8B-Instruct

The prompt is printed on stdout (and written to -o FILE if given)."""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``enhance`` subcommand; the parsed arguments carry :func:`handle` as ``handler``."""
    parser = subparsers.add_parser(
        "enhance",
        help="rewrite an edit instruction into ChronoEdit's dense prompt with a VLM",
        description="Rewrite a terse edit instruction, given the input image, into the 80-100 word "
        "'The user wants to ...' prompt ChronoEdit was trained on.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-i", "--input", required=True, metavar="IMAGE", help="the image to be edited")
    parser.add_argument("-p", "--prompt", required=True, metavar="TEXT", help="the edit instruction")
    parser.add_argument("-o", "--output", type=Path, metavar="FILE", help="also write the prompt to this text file")
    parser.add_argument("--quiet", action="store_true", help="no stage messages on stderr")
    add_vlm_args(parser)
    parser.set_defaults(handler=handle)
    return parser


def handle(args: argparse.Namespace) -> int:
    """Check the inputs, load the VLM, enhance, release the VLM, print (and write) the prompt."""
    from ..enhance import enhance_prompt, user_message
    from ..vlm import load_vlm

    user_message(args.prompt)  # an empty instruction fails before the VLM loads
    config = vlm_config_from_args(args)
    image = media.load_image(args.input)
    if args.output is not None:
        files.check_writable(args.output)
    if not args.quiet:
        print(f"chronoedit: enhancing the prompt with {config.where()}", file=sys.stderr, flush=True)
    with load_vlm(config) as vlm:
        prompt = enhance_prompt(vlm, image, args.prompt)
    print(prompt, flush=True)
    if args.output is not None:
        files.save_text(prompt + "\n", args.output)
    return 0


# -------------------------------------------------------------------------------- chronoedit edit --use-prompt-enhancer
ENHANCER_PREFIX = "prompt-enhancer"


def add_enhancer_args(parser: argparse.ArgumentParser) -> None:
    """``--use-prompt-enhancer`` and the ``--prompt-enhancer-*`` VLM flags (NVIDIA's names) for ``chronoedit edit``."""
    group = parser.add_argument_group("prompt enhancer")
    group.add_argument(
        "--use-prompt-enhancer", action="store_true",
        help="rewrite --prompt with a VLM into ChronoEdit's dense 'The user wants to ...' form first (printed and "
        "saved as <output stem>.prompt.txt); the VLM is released before the editing model loads",
    )  # fmt: skip
    add_vlm_args(parser, prefix=ENHANCER_PREFIX, group=group)


def enhancer_config(args: argparse.Namespace) -> VLMConfig | None:
    """The enhancer's VLM config when ``--use-prompt-enhancer`` is given; an error for its flags without it."""
    if not args.use_prompt_enhancer:
        given = [f"--{ENHANCER_PREFIX}-{name}" for name in ("model", "base_url")
                 if getattr(args, f"prompt_enhancer_{name}") is not None]  # fmt: skip
        if given:
            raise UserError(f"{given[0].replace('_', '-')} needs --use-prompt-enhancer")
        return None
    return vlm_config_from_args(args, prefix=ENHANCER_PREFIX)
