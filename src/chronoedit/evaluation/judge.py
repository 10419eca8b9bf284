"""Ask a VLM judge about each edit, with every reply cached so a killed run resumes without asking again.

The cache is a JSONL file, one line per answered question, appended and synced line by line (a line cut short by a
kill is ignored on reading). A question's key hashes the input and output images, the instruction, the question's
text, the rubric and the judge model, so changing any of them asks again and nothing else does. A reply that cannot
be used (malformed, out of range, a refusal) is asked again up to ``attempts`` times, then recorded as a failure: the
item is left out of the aggregates and named in the report, never a crash. An unreachable endpoint (a
:class:`~chronoedit.vlm.VLMError`) stops the run with one line; rerunning resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from ..files import writing
from ..vlm import VLM, VLMError
from .items import EvalItem
from .rubrics import ItemScore, Parsed, Question, ReplyError, Rubric


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ReplyCache:
    """Judge replies by question key, in an append-only JSONL file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.is_file():
            with writing(path, "read"):
                text = path.read_text(encoding="utf-8", errors="replace")
            for line in text.split("\n"):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and isinstance(record.get("key"), str):
                        self.records[record["key"]] = record

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def put(self, record: dict[str, Any]) -> None:
        """Append one record and sync it to disk before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        with writing(self.path), open(self.path, "a", encoding="utf-8") as handle:
            if handle.tell() > 0 and not self._ends_with_newline():
                handle.write("\n")  # after a line cut short by a kill
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.records[record["key"]] = record

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"


@dataclass
class Verdict:
    """One item judged: ``ok`` with its score, or failed with the reason; ``asked`` counts the VLM calls made now
    (0 when every answer came from the cache)."""

    ok: bool
    score: ItemScore | None = None
    error: str = ""
    kind: str = ""
    replies: dict[str, str] = field(default_factory=dict)
    asked: int = 0


class Judge:
    """Judges items with ``rubric`` on the VLM ``open_vlm()`` makes (opened on the first question not cached, closed
    by :meth:`close`); ``model`` names the judge in cache keys and results."""

    def __init__(self, rubric: Rubric, open_vlm: Callable[[], VLM], model: str, cache: ReplyCache,
                 attempts: int = 3, retry_failed: bool = False) -> None:  # fmt: skip
        self.rubric, self.model, self.cache = rubric, model, cache
        self.attempts, self.retry_failed = max(1, attempts), retry_failed
        self._open_vlm = open_vlm
        self._vlm: VLM | None = None
        self.calls = 0

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._vlm is not None:
            self._vlm.close()
            self._vlm = None

    def key(self, question: Question, item: EvalItem, digests: dict[str, str]) -> str:
        parts = [[digests[name] for name in question.images], item.instruction, question.key,
                 hashlib.sha256((question.system + "\x00" + question.text).encode()).hexdigest(),
                 self.rubric.name, self.rubric.digest, self.model]  # fmt: skip
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def judge(self, item: EvalItem, images: dict[str, Path]) -> Verdict:
        """Ask every question of the rubric about ``item`` (``images``: ``input`` and ``output`` files)."""
        digests = {name: file_digest(path) for name, path in images.items()}
        verdict, parsed = Verdict(ok=True), {}
        for question in self.rubric.questions(item):
            key = self.key(question, item, digests)
            record = self.cache.get(key)
            if record is None or (record.get("status") != "ok" and self.retry_failed):
                record = self._ask(question, item, images, key)
                verdict.asked += record["attempts"]
            verdict.replies[question.key] = record.get("reply", "")
            result = self._read(question, record)
            if isinstance(result, ReplyError):
                return Verdict(False, None, f"{question.key}: {result}", result.kind, verdict.replies, verdict.asked)
            parsed[question.key] = result
        verdict.score = self.rubric.combine(parsed)
        return verdict

    def _read(self, question: Question, record: dict[str, Any]) -> Parsed | ReplyError:
        if record.get("status") != "ok":
            return ReplyError(record.get("kind", "malformed"), record.get("error", "no usable reply"))
        try:
            return self.rubric.parse(question, record["reply"])
        except ReplyError as exc:  # a cached reply the rubric no longer reads
            return exc

    def _ask(self, question: Question, item: EvalItem, images: dict[str, Path], key: str) -> dict[str, Any]:
        """Ask until a reply parses or the attempts are used up; the outcome is cached either way."""
        pictures = [_load(images[name]) for name in question.images]
        reply, error = "", ReplyError("malformed", "no reply")
        for attempt in range(1, self.attempts + 1):
            reply = self._chat(question, pictures)
            try:
                self.rubric.parse(question, reply)
            except ReplyError as exc:
                error = exc
                continue
            return self._store(key, item, question, "ok", reply, attempt)
        return self._store(key, item, question, "failed", reply, self.attempts, error)

    def _chat(self, question: Question, pictures: list[Image.Image]) -> str:
        if self._vlm is None:
            self._vlm = self._open_vlm()
        self.calls += 1
        try:
            return self._vlm.chat(question.system, question.text, pictures)
        except VLMError as exc:
            if "empty answer" in str(exc):  # a reply, just an unusable one
                return ""
            raise

    def _store(self, key: str, item: EvalItem, question: Question, status: str, reply: str, attempts: int,
               error: ReplyError | None = None) -> dict[str, Any]:  # fmt: skip
        record = {"key": key, "id": item.id, "question": question.key, "status": status, "reply": reply,
                  "attempts": attempts, "judge": self.model, "rubric": self.rubric.name,
                  "rubric_digest": self.rubric.digest,
                  "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        if error is not None:
            record |= {"kind": error.kind, "error": f"{error} (after {attempts} attempts)"}
        self.cache.put(record)
        return record


def _load(path: Path) -> Image.Image:
    from ..media import load_image

    return load_image(path)
