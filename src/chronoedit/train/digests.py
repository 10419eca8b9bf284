"""Content hashes of large files (encoder weights), each file read once per machine.

A file's SHA-256 is remembered in ``$CHRONOEDIT_HOME/file-digests.json`` (default ``~/.cache/chronoedit``) under its
resolved path, size and modification time; a file that changes, or another copy of it, is hashed again. Hashing the
14B checkpoint's encoders (about 13 GB) takes a few tens of seconds once; later runs only stat the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ..io import atomic_path

MEMO_NAME = "file-digests.json"
BLOCK = 1 << 20


def memo_path() -> Path:
    home = os.environ.get("CHRONOEDIT_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "chronoedit") / MEMO_NAME


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def remembered_digests(log: Callable[[str], None] = lambda _: None) -> Iterator[Callable[[Path], str]]:
    """A function giving a file's digest, hashing only files not seen before in this state; new digests are saved
    when the block ends (atomically; a memo that cannot be read or written is only a lost shortcut)."""
    path = memo_path()
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    added: dict[str, str] = {}

    def digest(file: Path) -> str:
        stat = file.stat()
        key = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in memo:
            log(f"hashing {file.name} ({stat.st_size / 1e9:.1f} GB) once, to key the cache by the weights' content")
            memo[key] = added[key] = file_digest(file)
        return memo[key]

    yield digest
    if added:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(memo, indent=0, sort_keys=True), encoding="utf-8")
