"""Helpers for the server tests: a server state on the demo model (optionally with its own model loader), a stand-in
pipeline, a real uvicorn server in a thread, polling."""

from __future__ import annotations

import dataclasses
import io
import json
import socket
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from chronoedit import cli
from chronoedit.commands.serve import build_state
from chronoedit.editing import EditRunner
from chronoedit.serve.worker import Worker

TINY_FLAGS = ["--height", "32", "--width", "32", "--num-inference-steps", "2", "--device", "cpu", "--quiet"]


def serve_args(state_dir: Path, *extra: str) -> Any:
    """Parsed ``chronoedit serve`` flags for the demo model at 32x32, 2 steps."""
    return cli.parse_args(["serve", "--state-dir", str(state_dir), *TINY_FLAGS, *extra])


_MADE: list[Any] = []  # the states make_state built whose workers are not yet known to have ended


def make_state(state_dir: Path, *extra: str, load: Callable[..., Any] | None = None) -> Any:
    """The server's state as ``chronoedit serve`` builds it (worker not started). With ``load`` its worker runs on an
    :class:`~chronoedit.editing.EditRunner` that loads the model with ``load(spec, report)`` (the application layer's
    seam to count, slow down or fake model loads). Inside :func:`workers_end_here` its worker ends with the block."""
    state = build_state(serve_args(state_dir, *extra))
    if load is not None:
        old = state.worker
        worker = Worker(state.store, EditRunner(old.runner.spec, load=load), old.defaults, old.results_dir,
                        old.limits, enhancer=old.enhancer, redact=old.redact)  # fmt: skip
        state = dataclasses.replace(state, worker=worker)
    _MADE.append(state)
    return state


@contextmanager
def workers_end_here(timeout: float = 120.0) -> Iterator[None]:
    """Stop the worker of every state made in the block and wait until its thread has ended.

    A server stopped while its model loads does not wait for the load (``Worker.stop`` returns; the daemon thread
    ends with the process). In the tests such a worker outlived its test: it printed the demo model's note into a
    later test's captured stderr, held the process's one-load-at-a-time lock while later tests loaded, and when the
    session ended it was still inside torch's native code as the interpreter finalized, which aborted pytest after
    every test had passed ("terminate called without an active exception", exit code 134).
    """
    first = len(_MADE)
    try:
        yield
    finally:
        made = _MADE[first:]
        del _MADE[first:]
        for state in made:
            state.worker.stop()  # a loading worker goes on to the end of its load, then sees the stop
        deadline = time.monotonic() + timeout
        for state in made:
            while state.worker.alive:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the worker of {state.results_dir} did not end within {timeout:g} s")
                time.sleep(0.05)


class FakePipe:
    """A stand-in for a loaded pipeline: every edit a mid-grey frame of its size, except the prompts in ``fail``,
    where it raises ``RuntimeError`` as a bug would. ``prompts`` are the prompts it was called with. Like the real
    pipeline it calls ``callback_on_step_end`` after each step; with ``hold_decode`` it then sets ``decoding`` and
    waits for ``hold_decode`` before it returns (where the real one decodes the latents)."""

    def __init__(self, fail: tuple[str, ...] = (), hold_decode: threading.Event | None = None) -> None:
        self.fail, self.prompts, self.hold_decode = fail, [], hold_decode
        self.decoding = threading.Event()

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        pass

    def set_flow_shift(self, shift: float) -> None:
        pass

    def __call__(self, *, prompt: str, height: int, width: int, **kwargs: Any) -> Any:
        self.prompts.append(prompt)
        if prompt in self.fail:
            raise RuntimeError(f"a bug while editing {prompt!r}")
        callback = kwargs.get("callback_on_step_end")
        for step in range(kwargs.get("num_inference_steps", 0) if callback is not None else 0):
            callback(self, step, None, {})
        if self.hold_decode is not None:
            self.decoding.set()
            self.hold_decode.wait(30)
        return types.SimpleNamespace(frames=np.full((1, 1, height, width, 3), 0.5, dtype=np.float32))


def fake_load(pipe: Any, gate: threading.Event | None = None) -> Callable[..., Any]:
    """A model loader that returns ``pipe`` (after ``gate`` is set, when given)."""

    def load(spec: Any, report: Any) -> Any:
        if gate is not None:
            gate.wait(30)
        return pipe

    return load


def png_bytes(size: tuple[int, int] = (48, 32), color: tuple[int, int, int] = (200, 120, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def submit(client: Any, options: dict[str, Any] | str | bytes, image: bytes | None = None, **kwargs: Any) -> Any:
    """POST /v1/edits with a multipart image and JSON options (a str or bytes are sent as they are)."""
    files = {"image": ("in.png", png_bytes() if image is None else image, "image/png")}
    data = {"options": options if isinstance(options, (str, bytes)) else json.dumps(options)}
    return client.post("/v1/edits", files=files, data=data, **kwargs)


def wait_ready(client: Any, timeout: float = 120.0) -> dict[str, Any]:
    """Poll /v1/health until the worker has loaded the model."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = client.get("/v1/health").json()
        if health["worker"]["state"] != "loading":
            return health
        time.sleep(0.1)
    raise TimeoutError("the worker did not load the model in time")


def wait_finished(client: Any, job_id: str, timeout: float = 120.0, **kwargs: Any) -> dict[str, Any]:
    """Poll a job until it is done, failed or cancelled; returns its last status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/edits/{job_id}", **kwargs).json()
        if status["finished"]:
            return status
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not finish in time")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(app: Any) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 in a thread, with the HTTP protocol ``chronoedit serve`` uses (its read
    timeout from the app's limits); yields its base URL."""
    import uvicorn

    from chronoedit.serve.guards import http_protocol

    port = free_port()
    protocol = http_protocol(app.state.chronoedit.limits.read_timeout_s)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=protocol))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
