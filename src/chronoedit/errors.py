"""The one user-error type, and the one-line form of any exception.

A :class:`UserError` is a problem with what the user gave (a value, a file, a checkpoint), never a bug. It names the
*field* it is about in the settings' own words (``seed``, ``num_inference_steps``, ``image``); each front end words
fields its own way (``--seed`` on the command line, ``seed`` in the HTTP API and in manifest columns) through
:meth:`UserError.render`. Anything that is not a ``UserError`` is a bug and is shown as one.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


class UserError(ValueError):
    """A problem with the user's input. ``message`` may hold ``{name}`` placeholders for ``field`` and ``also`` (the
    other fields it mentions); ``str()`` shows them by their settings names."""

    def __init__(self, message: str, field: str | None = None, also: tuple[str, ...] = ()) -> None:
        self.template = message
        self.field = field
        self.fields = tuple(dict.fromkeys(name for name in (field, *also) if name))
        super().__init__(self.render())

    def render(self, word: Callable[[str], str] | None = None) -> str:
        """The message as one line, each named field as ``word(field)`` (default: the field's own name)."""
        word = word or (lambda name: name)
        text = _PLACEHOLDER.sub(lambda m: word(m[1]) if m[1] in self.fields else m[0], self.template)
        return " ".join(text.split())

    def __reduce__(self) -> tuple:  # picklable across processes (Ray, multiprocessing) with its fields
        return (_rebuild, (self.template, self.field, self.fields[1:] if self.field else self.fields))


class RankError(UserError):
    """A user error that is one rank's own in a multi-process launch (its device, its disk), said by that rank; any
    other user error is the same on every rank and said by rank 0 alone (:func:`chronoedit.cli.main`)."""


def _rebuild(message: str, field: str | None, also: tuple[str, ...]) -> UserError:
    return UserError(message, field, also)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__
