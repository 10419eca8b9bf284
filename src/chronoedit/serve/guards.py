"""What stands between the network and the routes of ``chronoedit serve``: time and size limits on a request, UTF-8
form fields, and JSON for every error answer.

- :func:`http_protocol`: uvicorn's HTTP/1.1 protocol with a deadline for a request's line and headers (uvicorn has
  none: its ``timeout_keep_alive`` restarts with every byte, so a client trickling its headers held a connection
  for ever), and its own 400 answers in JSON
- :class:`BodyLimit`: the upload's size and pace (a stalled or trickling upload is answered 408)
- :class:`Utf8FormRoute`: multipart text fields must be UTF-8 (starlette decodes others as latin-1 without a word);
  a full disk while the upload is spooled is 507
- :class:`JsonErrors`: an error answer written as plain text (starlette's own, for a bad ``Range`` header) is
  rewritten as ``{"detail": ...}``
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from http import HTTPStatus
from typing import Any

import anyio
from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

from .options import Limits
from .store import is_disk_full

FORM_SLACK_BYTES = 1 << 20  # room for the options and the multipart framing beside the image
MIN_UPLOAD_RATE = 16 * 1024  # bytes per second an upload must average once its first read timeout has passed
UPLOAD_NOT_RECEIVED = "the server's disk is full: the upload cannot be received; try again later"
_MAX_ERROR_BODY = 64 * 1024  # of a plain-text error answer kept for its JSON form


def upload_too_large(limit: int) -> str:
    return f"the upload is over this server's limit of {limit} bytes"


def too_slow(timeout: float) -> str:
    return (f"the request arrived too slowly: this server waits {timeout:g} s for each part of it and needs "
            f"{MIN_UPLOAD_RATE // 1024} KiB/s on average")  # fmt: skip


def json_answer(status: int, detail: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The body and headers of a ``{"detail": ...}`` answer."""
    body = json.dumps({"detail": detail}).encode()
    return body, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]


# ---------------------------------------------------------------------------------------------- the request's headers
def http_protocol(read_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol (pass it as ``uvicorn.run(..., http=...)``) where a connection whose request line and
    headers have not all arrived ``read_timeout`` seconds after it opened (or after its last answer) is answered
    408 and closed, as is one still sending a body the server has already answered; uvicorn's own 400 answers (a
    malformed request) are JSON. Built on uvicorn's ``H11Protocol`` hooks: ``connection_made``,
    ``on_response_complete``, ``connection_lost``, ``send_400_response``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self._answer_and_close(400, " ".join(msg.split()))

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(read_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE:  # its request line and headers are not all here
                self._answer_and_close(408, too_slow(read_timeout))
            elif self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.DONE:
                self.transport.close()  # still sending a body that was answered already

        def _answer_and_close(self, status: int, detail: str) -> None:
            body, headers = json_answer(status, detail)
            try:
                reason = _phrase(status).encode()
                output = self.conn.send(h11.Response(status_code=status, reason=reason,
                                                     headers=[*headers, (b"connection", b"close")]))  # fmt: skip
                output += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
            except h11.LocalProtocolError:  # an answer already started: nothing more can be said
                output = b""
            self.transport.write(output)
            self.transport.close()

    return TimedH11Protocol


# --------------------------------------------------------------------------------------------------------- the upload
class BodyLimit:
    """ASGI middleware for the upload (``POST /v1/edits``).

    Size: a Content-Length over the limit is answered 413 before any body is read; otherwise the bytes are counted
    as they arrive and 413 comes once they pass the limit, so a body without Content-Length (chunked) is never read,
    nor spooled to disk, beyond it.

    Time: each part of the body must arrive within ``limits.read_timeout_s`` of the call that waits for it, and
    after the first ``read_timeout_s`` the body must average :data:`MIN_UPLOAD_RATE`; 408 (and the connection
    closed) otherwise, so a client that stalls or trickles its upload does not hold the server's form parser.
    """

    def __init__(self, app: Any, state: Any) -> None:
        self.app, self.state = app, state  # state: anything with the server's ``limits``

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/edits":
            return await self.app(scope, receive, send)
        limits: Limits = self.state.limits
        allowed = limits.max_upload_bytes + FORM_SLACK_BYTES
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > allowed:
            too_large = JSONResponse({"detail": upload_too_large(limits.max_upload_bytes)}, status_code=413)
            return await too_large(scope, receive, send)
        await self.app(scope, _PacedReceive(receive, limits, allowed), send)


class _PacedReceive:
    """``receive`` of one upload, counted and timed (see :class:`BodyLimit`); its errors are HTTPExceptions, which
    FastAPI's form parsing passes on."""

    def __init__(self, receive: Any, limits: Limits, allowed: int) -> None:
        self.receive, self.limits, self.allowed = receive, limits, allowed
        self.started, self.seen, self.done, self.timed_out = time.monotonic(), 0, False, False

    async def __call__(self) -> dict[str, Any]:
        if self.timed_out:
            return {"type": "http.disconnect"}
        if self.done:  # the body is in: a wait for the client's disconnect is not limited
            return await self.receive()
        timeout = self.limits.read_timeout_s
        wait = min(timeout, self.started + timeout + self.seen / MIN_UPLOAD_RATE - time.monotonic())
        try:
            with anyio.fail_after(max(wait, 0.0)):
                message = await self.receive()
        except TimeoutError:
            self.timed_out = True
            raise HTTPException(408, too_slow(timeout), headers={"Connection": "close"}) from None
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
        if self.seen > self.allowed:
            raise HTTPException(413, upload_too_large(self.limits.max_upload_bytes))
        return message


# ----------------------------------------------------------------------------------------------------- form fields
class Utf8FieldsParser(MultiPartParser):
    """starlette's multipart parser, noting the text fields whose bytes are not UTF-8 (starlette decodes those as
    latin-1, so a client's mis-encoded prompt would be edited as mojibake)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.not_utf8: list[str] = []

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode("utf-8")
            except UnicodeDecodeError:
                self.not_utf8.append(" ".join(part.field_name.split())[:100])
        super().on_part_end()


class Utf8FormRequest(Request):
    """A request whose multipart form is read by :class:`Utf8FieldsParser`: 422 ``FIELD: not UTF-8 text`` for a
    text field that is not UTF-8, 507 when the disk fills while the upload is spooled."""

    async def form(self, **limits: Any) -> FormData:  # type: ignore[override]
        content_type = self.headers.get("content-type", "").partition(";")[0].strip().lower()
        if self._form is None and content_type == "multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    parser = Utf8FieldsParser(self.headers, stream, **limits)
                    self._form = await parser.parse()
            except MultiPartException as exc:
                raise HTTPException(400, exc.message) from None
            except OSError as exc:
                if is_disk_full(exc):
                    raise HTTPException(507, UPLOAD_NOT_RECEIVED) from None
                raise
            if parser.not_utf8:
                await self._form.close()
                raise HTTPException(422, f"{parser.not_utf8[0]}: not UTF-8 text")
        return await super().form(**limits)


class Utf8FormRoute(APIRoute):
    """Routes whose forms are read as :class:`Utf8FormRequest` (FastAPI's way to change the request class)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def utf8_forms(request: Request) -> Response:
            return await handler(Utf8FormRequest(request.scope, request.receive))

        return utf8_forms


# --------------------------------------------------------------------------------------------------------- the errors
class JsonErrors:
    """ASGI middleware: an error answer (4xx, 5xx) that is not JSON gets the body ``{"detail": "<its text, or its
    status's name>"}``, its other headers kept (starlette answers a bad ``Range`` header in plain text)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] | None = None
        text = bytearray()

        async def sending(message: dict[str, Any]) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400 and not _is_json(message):
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            text.extend(message.get("body", b"")[: _MAX_ERROR_BODY - len(text)])
            if not message.get("more_body", False):
                await _send_as_json(send, held, text.decode("utf-8", "replace"), scope["method"] == "HEAD")

        await self.app(scope, receive, sending)


def _is_json(start: dict[str, Any]) -> bool:
    content_type = dict(start.get("headers", [])).get(b"content-type", b"")
    return content_type.split(b";")[0].strip().lower() == b"application/json"


async def _send_as_json(send: Any, start: dict[str, Any], text: str, head: bool) -> None:
    status = start["status"]
    detail = " ".join(text.split()) or _phrase(status)
    body, headers = json_answer(status, detail)
    kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
    await send({"type": "http.response.start", "status": status, "headers": kept + headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def _phrase(status: int) -> str:
    """A status's name ("Requested Range Not Satisfiable"), or ``error``."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"
