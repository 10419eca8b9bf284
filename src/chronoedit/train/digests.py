"""Content hashes of large files (encoder weights), each file read once per machine.

A file's SHA-256 is remembered in ``$CHRONOEDIT_HOME/file-digests.json`` (default ``~/.cache/chronoedit``), and for
the life of the process, under its resolved path, inode, size, modification and change times (a rewrite changes the
change time, which no tool sets back); a file that changes, or another copy of it, is hashed again. Hashing the
14B checkpoint's encoders (about 13 GB) takes a few tens of seconds once; later runs only stat the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from ..files import chronoedit_home, write_json

MEMO_NAME = "file-digests.json"
BLOCK = 1 << 20
_SEEN: dict[str, str] = {}  # this process's digests (when the memo file cannot be written, still hashed once)


def memo_path() -> Path:
    return chronoedit_home() / MEMO_NAME


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
    memo.update(_SEEN)
    added: dict[str, str] = {}

    def digest(file: Path) -> str:
        stat = file.stat()
        key = f"{file.resolve()}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
        if key not in memo:
            log(f"hashing {file.name} ({stat.st_size / 1e9:.1f} GB) once, to key the cache by the weights' content")
            memo[key] = added[key] = _SEEN[key] = file_digest(file)
        return memo[key]

    yield digest
    if added:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, memo)
        except OSError as err:
            log(f"note: cannot remember weight digests in {path} ({err.strerror or err}): later runs hash again")
