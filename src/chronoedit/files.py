"""Files chronoedit writes: atomic writes (temp name, then rename), file locks, writability checks, its home folder.

Every writer in the package goes through :func:`atomic_path`, so a failed or interrupted write never leaves a partial
file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import UserError, one_line


def chronoedit_home() -> Path:
    """Where chronoedit keeps its own files (the demo model, remembered weight digests): ``$CHRONOEDIT_HOME``, else
    ``~/.cache/chronoedit``."""
    home = os.environ.get("CHRONOEDIT_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "chronoedit"


_TEMP_NAME = re.compile(r"(?P<name>.+)\.tmp-\d+-[0-9a-f]{8}(?P<suffix>\.[^./]*)?")
_PROBE_NAME = re.compile(r"\..+\.probe-\d+-[0-9a-f]{8}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is exactly what :func:`atomic_path` or the writability probe call their temporary files."""
    if _PROBE_NAME.fullmatch(name):
        return True
    match = _TEMP_NAME.fullmatch(name)
    return bool(match) and match["name"].endswith(match["suffix"] or "")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix); on success move it onto ``path`` with ``os.replace``.

    Before the rename the temporary file's data is flushed to the disk (``fsync``): a write the disk could not hold
    (a full disk that reports only on flush, a quota) fails here, as an OSError, instead of leaving a short file
    under the final name. On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        _flush_to_disk(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _flush_to_disk(path: Path) -> None:
    """fsync a file the caller has written and closed; OSError (ENOSPC, EIO, EDQUOT) when the disk did not take it.
    A writer that produced no file at all is a bug in that writer, so it is not excused here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_text(text: str, path: str | os.PathLike) -> Path:
    """Write a UTF-8 text file atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def open_regular(path: str | os.PathLike, what: str = "file") -> IO[bytes]:
    """Open ``path`` for reading in binary mode, refusing at once anything that is not a regular file.

    A named pipe would block the reader until some other process writes to it, and a device or socket is never an
    input: the file is opened without blocking and checked on the open handle (no race between a check and the
    open). UserError ``cannot read WHAT PATH: reason`` otherwise (missing, a folder, a pipe, no permission).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        reason = "not found" if exc.errno == errno.ENOENT else os_reason(exc, path)
        raise UserError(f"cannot read {what} {path}: {reason}") from None
    kind = _file_kind(os.fstat(fd).st_mode)
    if kind != "file":
        os.close(fd)
        raise UserError(f"cannot read {what} {path}: it is {kind}, not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_regular(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it is a regular file (symlinks followed); the one-line UserError of :func:`open_regular` if not.
    For readers that take a path (safetensors, ffmpeg); the check opens nothing, so it never blocks."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        reason = "not found" if exc.errno == errno.ENOENT else os_reason(exc, path)
        raise UserError(f"cannot read {what} {path}: {reason}") from None
    kind = _file_kind(mode)
    if kind != "file":
        raise UserError(f"cannot read {what} {path}: it is {kind}, not a regular file")
    return path


def _file_kind(mode: int) -> str:
    """``file`` for a regular file, else what it is, in words."""
    kinds = ((stat.S_ISREG, "file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a file")


def hold_lock(path: str | os.PathLike, busy: str) -> IO[str]:
    """Take an exclusive lock on the file ``path`` (created if needed) and return its open handle: the lock lasts
    until the handle is closed or the process ends (the OS releases it even on SIGKILL). UserError(``busy``) when
    another process holds it. Where ``fcntl`` is missing (not POSIX) nothing is locked."""
    handle = open(path, "a")  # noqa: SIM115 - the open handle is the lock
    try:
        import fcntl
    except ImportError:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(busy) from None
    return handle


@contextlib.contextmanager
def locked(path: str | os.PathLike, busy: str) -> Iterator[None]:
    """:func:`hold_lock` for the duration of a ``with`` block."""
    handle = hold_lock(path, busy)
    try:
        yield
    finally:
        handle.close()



def check_writable(path: str | os.PathLike) -> None:
    """Make sure ``path`` can be written: its folder exists (it is created if needed) and accepts new files.

    Raises UserError("cannot write output PATH: <reason>") otherwise. Call this before any expensive work.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write output {path}: it is a directory")
    parent = path.parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"cannot write output {path}: {blocker} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"cannot write output {path}: {reason}") from exc



def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented, key-sorted JSON atomically."""
    return save_text(json.dumps(data, indent=2, sort_keys=True) + "\n", path)


# ------------------------------------------------------------------------------------------ OS errors as user errors
def os_reason(exc: OSError, path: Path | None = None) -> str:
    """Why ``exc`` happened, in a few words; with the file it names when that is not ``path`` (nor a temp file)."""
    text = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
    filename = exc.filename
    if filename and (path is None or Path(filename) != path) and not is_temp_name(Path(filename).name):
        text = f"{filename}: {text}"
    return text


def is_out_of_space(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised from, is a full disk (or a used-up quota)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__
    return False


def is_io_error(exc: BaseException) -> bool:
    """An OSError, or safetensors' own error for a failed read or write (it raises no OSError)."""
    return isinstance(exc, OSError) or (type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc))


@contextlib.contextmanager
def writing(path: Path, what: str = "write") -> Iterator[None]:
    """An OS error in the block is a UserError ``cannot WHAT PATH: reason``; other errors pass."""
    try:
        yield
    except Exception as exc:
        if not is_io_error(exc):
            raise
        why = os_reason(exc, path) if isinstance(exc, OSError) else one_line(exc)
        raise UserError(f"cannot {what} {path}: {why}") from exc
