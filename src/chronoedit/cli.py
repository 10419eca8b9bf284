"""The ``chronoedit`` command line: a thin dispatcher over the subcommands in :mod:`chronoedit.commands`.

Each subcommand module registers its parser and a ``handler``; :func:`main` parses, calls the handler and applies one
error policy: user errors (bad input, paths, values, anything raised by chronoedit) become one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands import batch, convert, edit, enhance, label, serve, train


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
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); argparse errors exit with code 2 after one line."""
    return build_parser().parse_args(argv)


def _is_user_error(exc: BaseException) -> bool:
    """Errors reported as one line: bad input/paths/values, and anything raised by chronoedit itself."""
    return isinstance(exc, (ValueError, OSError)) or type(exc).__module__.split(".")[0] == "chronoedit"


def _error_message(exc: BaseException) -> str:
    """The exception as one line, with a hint for out-of-memory errors."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    if type(exc).__name__ == "OutOfMemoryError":
        message += " (out of memory: try --offload_model, a smaller --max-area or --dtype bf16)"
    return message


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``chronoedit`` console script; returns the exit code."""
    try:
        args = parse_args(argv)
        return args.handler(args)
    except SystemExit as exc:  # argparse: --help, --version, usage errors (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except KeyboardInterrupt:
        print("chronoedit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not (_is_user_error(exc) or type(exc).__name__ == "OutOfMemoryError"):
            raise
        print(f"chronoedit: error: {_error_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
