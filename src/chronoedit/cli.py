"""The ``chronoedit`` command line: a thin dispatcher over the subcommands in :mod:`chronoedit.commands`.

Each subcommand module registers its parser and a ``handler``; :func:`main` parses, calls the handler and applies the
one error policy: a user error is one line and exit code 2, anything else is a bug (traceback, exit code 1).
"""

from __future__ import annotations

import argparse
import sys
import traceback

from . import __version__
from .commands import batch, convert, edit, enhance, eval, label, serve, train
from .commands.flags import flag_word
from .errors import RankError, UserError, one_line


class _Parser(argparse.ArgumentParser):
    """argparse with the same one-line error format as the rest of the CLI (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"chronoedit: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``chronoedit`` parser; every subcommand module registers itself (parser, flags and handler)."""
    parser = _Parser(prog="chronoedit", description="ChronoEdit: physically consistent image editing.")
    parser.add_argument("--version", action="version", version=f"chronoedit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    edit.register(subparsers)
    convert.register(subparsers)
    batch.register(subparsers)
    serve.register(subparsers)
    enhance.register(subparsers)
    label.register(subparsers)
    train.register(subparsers)
    eval.register(subparsers)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); argparse errors exit with code 2 after one line."""
    return build_parser().parse_args(argv)


OOM_HINT = "out of memory: try --offload_model, a smaller --max-area or --dtype bf16"
BUG_NOTE = "chronoedit: this is a bug in chronoedit, not in your input: please report it with the traceback above"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``chronoedit`` console script; returns the exit code.

    A :class:`~chronoedit.errors.UserError` is one line (fields named as flags) and exit code 2, as is running out of
    memory; anything else is a bug: its traceback, a line saying so, and exit code 1.
    """
    try:
        args = parse_args(argv)
        return args.handler(args)
    except SystemExit as exc:  # argparse: --help, --version, usage errors (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except KeyboardInterrupt:
        print("chronoedit: interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        if not _says(exc):
            return 2
        print(f"chronoedit: error: {exc.render(flag_word)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch
            print(f"chronoedit: error: {one_line(exc)} ({OOM_HINT})", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(BUG_NOTE, file=sys.stderr)
        return 1


def _says(exc: UserError) -> bool:
    """Whether this process prints the error: in a launch of several processes (torchrun) the same error is met by
    every rank and said by rank 0 alone, except a rank's own (:class:`~chronoedit.errors.RankError`)."""
    from .parallel.ranks import from_env

    try:
        return isinstance(exc, RankError) or from_env().is_main
    except UserError:  # the launcher's variables make no sense: say it
        return True


if __name__ == "__main__":
    sys.exit(main())
