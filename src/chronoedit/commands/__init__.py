"""Subcommands of the ``chronoedit`` command line, one module each.

Every module exposes ``register(subparsers)``: it adds its parser, its flags and, via
``set_defaults(handler=...)``, the function that :func:`chronoedit.cli.main` calls with the parsed arguments.
"""
