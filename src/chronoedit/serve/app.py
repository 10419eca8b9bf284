"""The HTTP API and web UI of ``chronoedit serve`` (FastAPI).

- ``POST /v1/edits``: multipart ``image`` (file) + ``options`` (JSON, see :class:`EditOptions`) -> 202 and a job id
- ``GET /v1/edits/{id}``: status, queue position, progress (step/total), error, timings
- ``GET /v1/edits/{id}/result`` (the edited image), ``/trajectory`` (mp4), ``/trajectory-sheet`` (png), ``/input``,
  ``/prompt`` (the enhanced prompt, text)
- ``DELETE /v1/edits/{id}``: cancel a queued job
- ``GET /v1/health``, ``GET /v1/config`` (presets, limits, defaults for clients)
- ``/openapi.json`` and ``/docs`` (Swagger UI, working offline)
- ``/``: the web UI (static files shipped in the package)

Every error is JSON ``{"detail": "<one line>"}`` with a 4xx status for anything the client can fix, 507 when the
server's disk is full, 503 when its queue cannot be read, 500 (``internal error``) for a bug. Files are served only
from inside the results folder: never through a symbolic link.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import sqlite3
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, media
from ..errors import UserError, one_line
from ..presets import PRESETS
from .editing import INPUT_NAME, BadImage, TooLarge, build_job, decode_upload, resolved_settings, with_seed
from .guards import BodyLimit, JsonErrors, Utf8FormRoute
from .options import MEDIA_TYPES, EditOptions, Limits, describe_validation
from .pool import WorkerPool
from .store import FINISHED, QUEUED, RUNNING, Job, JobStore, QueueFull, is_disk_full, new_job_id
from .worker import BROKEN, DISK_FULL, Worker

STATIC_DIR = Path(__file__).with_name("static")
JOB_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
FILE_ROLES = {
    "result": "result", "trajectory": "trajectory", "trajectory-sheet": "trajectory_sheet", "prompt": "prompt",
}  # fmt: skip


@dataclass
class ServerState:
    """Everything the routes need; built by :func:`chronoedit.commands.serve` or by tests."""

    store: JobStore
    worker: Worker | WorkerPool  # the one thread, or (``--devices``) one worker process per device
    results_dir: Path
    limits: Limits
    token: str | None = None
    model_name: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application over ``state`` (the worker is started and stopped with the app)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        if not state.worker.alive:
            state.worker.start()
        yield
        state.worker.stop()

    # /docs with its assets served from the fastapi-offline package: no CDN, it works offline. No /redoc: ReDoc
    # fetches its logo from a CDN.
    app = FastAPIOffline(
        title="ChronoEdit", version=__version__, lifespan=lifespan, static_url="/docs-assets", redoc_url=None,
        description="Physically consistent image editing by video generation.",
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
    )  # fmt: skip
    app.state.chronoedit = state
    app.add_middleware(BodyLimit, state=state)  # inside the guard: raised while FastAPI parses the form
    app.middleware("http")(_guard(state))
    app.add_middleware(JsonErrors)  # outermost of ours: sees every answer but a crash's (a handler below)
    _add_error_handlers(app)
    app.include_router(_api_routes(state))
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"detail": "<one line>"}``: validation errors, HTTP errors (from routes, middleware and
    starlette: 404, 405), the job queue's database failing, and bugs."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_validation(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = " ".join(str(exc.detail).split())
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(sqlite3.Error)
    async def queue_error(_request: Request, exc: sqlite3.Error) -> JSONResponse:
        if is_disk_full(exc):
            return JSONResponse({"detail": DISK_FULL}, status_code=507)
        return JSONResponse({"detail": f"the job queue cannot be read now: {one_line(exc)}"}, status_code=503,
                            headers={"Retry-After": "10"})  # fmt: skip

    @app.exception_handler(Exception)  # a bug: its traceback goes to the server's log (uvicorn's)
    async def internal_error(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "internal error: see the server's log"}, status_code=500)


def _api_routes(state: ServerState):  # type: ignore[no-untyped-def]
    from fastapi import APIRouter, Depends
    from fastapi.security import HTTPBearer

    # The token itself is checked by the guard middleware; this declares it, so /docs offers "Authorize".
    bearer = HTTPBearer(auto_error=False, description="the server's token, when it was started with one")
    router = APIRouter(prefix="/v1", dependencies=[Depends(bearer)], route_class=Utf8FormRoute)

    @router.post("/edits", status_code=202, summary="Queue an edit")
    def submit(
        image: Annotated[UploadFile, File(description="the image to edit (PNG, JPEG, WebP, GIF, BMP, TIFF)")],
        options: Annotated[str, Form(description='JSON edit options, e.g. {"prompt": "..."}')],
    ) -> dict[str, Any]:
        # A plain function: FastAPI runs it in a worker thread, so decoding never blocks the event loop.
        if not state.worker.accepting:
            raise HTTPException(503, f"this server cannot run edits now: {state.worker.error or 'worker stopped'}")
        check_queue_room(state)  # cheap, before any decoding (checked again when the job is queued)
        opts = parse_options(options)
        if opts.enhance_prompt and state.worker.enhancer is None:
            raise HTTPException(422, "enhance_prompt: this server has no prompt enhancer")
        data = read_limited(image, state.limits.max_upload_bytes)
        return submit_job(state, opts, data)

    @router.get("/edits/{job_id}", summary="Status and progress of an edit")
    def status(job_id: str) -> dict[str, Any]:
        return describe_job(state, find_job(state, job_id))

    @router.delete("/edits/{job_id}", summary="Cancel a queued edit")
    def cancel(job_id: str) -> dict[str, Any]:
        job = find_job(state, job_id)
        if not state.store.cancel(job.id):
            job = find_job(state, job_id)  # its status now, not before the attempt
            raise HTTPException(409, f"edit {job.id} is {job.status}: only queued edits can be cancelled")
        return describe_job(state, find_job(state, job_id))

    @router.get("/edits/{job_id}/input", summary="The input image as the server stored it")
    def input_image(job_id: str) -> FileResponse:
        job = find_job(state, job_id)
        return job_file(state.results_dir, job.id, INPUT_NAME)

    @router.get("/edits/{job_id}/{role}", summary="The edited image (result), trajectory video or contact sheet")
    def result(job_id: str, role: str) -> FileResponse:
        if role not in FILE_ROLES:
            raise HTTPException(404, f"no such resource: {role} (result, trajectory, trajectory-sheet, input)")
        job = find_job(state, job_id)
        if job.status != "done":
            reason = f": {job.error}" if job.error else ""
            raise HTTPException(409, f"edit {job.id} is {job.status}{reason}")
        name = job.files.get(FILE_ROLES[role])
        if name is None:
            hint = "ask for enhance_prompt" if role == "prompt" else "ask for return_trajectory with reasoning"
            raise HTTPException(404, f"edit {job.id} has no {role} ({hint})")
        return job_file(state.results_dir, job.id, name)

    @router.get("/health", summary="Liveness, model state and queue")
    def health() -> dict[str, Any]:
        counts = state.store.counts()
        worker = state.worker.describe()
        answer = {"status": health_status(worker), "version": __version__, "model": state.model_name,
                  "worker": worker, "queue": {"queued": counts[QUEUED], "running": counts[RUNNING],
                                              "limit": state.limits.max_queue}}  # fmt: skip
        if isinstance(state.worker, WorkerPool):  # every worker process: device, pid, alive, job, jobs run
            answer["workers"] = state.worker.describe_workers()
        return answer

    @router.get("/config", summary="Presets, limits and defaults, for clients")
    def config() -> dict[str, Any]:
        presets = [{"name": p.name, "summary": p.summary, "num_inference_steps": p.num_inference_steps,
                    "guidance_scale": p.guidance_scale} for p in PRESETS.values()]  # fmt: skip
        return {"model": state.model_name, "presets": presets, "limits": asdict(state.limits),
                "defaults": state.defaults, "output_formats": ["png", "jpeg", "webp"],
                "prompt_enhancer": state.worker.enhancer is not None}  # fmt: skip

    return router


DEGRADED_DISK_FULL = "degraded: disk full"


def health_status(worker: dict[str, Any]) -> str:
    """``ok``; ``error`` when the worker is dead or its model did not load (with ``--devices``: every worker);
    ``degraded: disk full`` while the server's last write failed for lack of space (until one succeeds);
    ``degraded: ...`` when some of the worker processes are down."""
    if worker["state"] == BROKEN or not worker["alive"]:
        return "error"
    if worker.get("disk_full"):
        return DEGRADED_DISK_FULL
    return f"degraded: {worker['down']}" if worker.get("down") else "ok"


def _guard(state: ServerState):  # type: ignore[no-untyped-def]
    """HTTP middleware run before any body is read: with a token configured every /v1 route but /v1/health needs
    ``Authorization: Bearer`` (the upload size is :class:`BodyLimit`'s, inside it)."""

    async def guard(request: Request, call_next: Any) -> Any:
        path = request.url.path
        if state.token is not None and path.startswith("/v1/") and path != "/v1/health":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token_matches(given.strip(), state.token):
                return JSONResponse({"detail": "a valid bearer token is required (Authorization: Bearer <token>)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        return await call_next(request)

    return guard


def token_matches(given: str, token: str) -> bool:
    """Whether a header's token is the server's, compared as bytes in constant time: starlette hands header values
    over decoded as latin-1 (so their bytes come back exactly), and the server's token is UTF-8 (as it came from the
    environment, undecodable bytes included)."""
    return secrets.compare_digest(given.encode("latin-1"), token.encode("utf-8", "surrogateescape"))


def check_queue_room(state: ServerState) -> None:
    """429 when the queue is already full."""
    counts = state.store.counts()
    if counts[QUEUED] + counts[RUNNING] >= state.limits.max_queue:
        raise HTTPException(429, f"the queue is full (the limit is {state.limits.max_queue} jobs waiting or "
                                 "running); try again later", headers={"Retry-After": "10"})  # fmt: skip


def parse_options(text: str) -> EditOptions:
    """The ``options`` form field (already known to be UTF-8, see :class:`~.guards.Utf8FormRoute`); 422 naming the
    bad field."""
    try:
        return EditOptions.model_validate_json(text)
    except ValidationError as exc:
        raise HTTPException(422, "options: " + describe_validation(exc.errors())) from None


def read_limited(upload: UploadFile, limit: int) -> bytes:
    """The uploaded file's bytes; 413 as soon as it is over ``limit``."""
    chunks, size = [], 0
    while chunk := upload.file.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the image is over this server's upload limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def submit_job(state: ServerState, options: EditOptions, data: bytes) -> dict[str, Any]:
    """Decode, validate and queue one edit; the job's folder exists only if it was queued."""
    try:
        image = decode_upload(data, state.limits)
    except TooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except BadImage as exc:
        raise HTTPException(400, str(exc)) from None
    options = with_seed(options, state.worker.defaults.seed)
    job_id = new_job_id()
    job_dir = state.results_dir / job_id
    stored = "the uploaded image cannot be stored"
    try:
        job_dir.mkdir(parents=True)
        media.save_image(image, job_dir / INPUT_NAME)
        edit, _plan = build_job(state.worker.spec, state.worker.defaults, options, job_dir, state.limits)
        stored = "the edit cannot be queued"
        state.store.submit(
            options.model_dump(exclude_none=True),
            state.limits.max_queue,
            job_id=job_id,
            total=edit.num_inference_steps,
        )
    except Exception as exc:  # nothing half-stored: no folder (and the queue's transaction rolled back)
        shutil.rmtree(job_dir, ignore_errors=True)
        answer = _submit_error(state, exc, stored)
        if answer is exc:
            raise
        raise answer from None
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    state.worker.disk_full = False
    state.worker.wake()
    return describe_job(state, find_job(state, job_id)) | {"settings": resolved_settings(edit)}


def _submit_error(state: ServerState, exc: Exception, stored: str) -> Exception:
    """What a failed submission answers: 507 for a full disk, 429 for a full queue, 422 for a user error; anything
    else is raised as it is (a bug)."""
    if is_disk_full(exc):
        state.worker.disk_full = True
        return HTTPException(507, f"the server's disk is full: {stored}; try again later")
    if isinstance(exc, QueueFull):
        return HTTPException(429, str(exc), headers={"Retry-After": "10"})
    if isinstance(exc, UserError):
        return HTTPException(422, state.worker.public_error(exc))
    return exc


def find_job(state: ServerState, job_id: str) -> Job:
    """The job with this id; 404 for anything else (ids are checked before any lookup)."""
    job = state.store.get(job_id) if JOB_ID.fullmatch(job_id) else None
    if job is None:
        keep = state.limits.keep_results_hours
        kept = "" if keep is None else f" (this server deletes edits {keep:g} hours after they finish)"
        raise HTTPException(404, f"no edit with this id{kept}")
    return job


def describe_job(state: ServerState, job: Job) -> dict[str, Any]:
    """A job as the API shows it (links only to the files it has)."""
    progress = state.worker.progress_for(job.id)
    step, total, stage = job.step, job.total, None
    if job.status == RUNNING and progress is not None:
        step, total, stage = progress.step, progress.total, progress.stage
    base = f"/v1/edits/{job.id}"
    links = {"self": base, "input": f"{base}/input"}
    if job.status == "done":
        links |= {role: f"{base}/{role}" for role, key in FILE_ROLES.items() if key in job.files}
    return {
        "id": job.id, "status": job.status, "position": job.position,
        "progress": {"step": step, "total": total, "stage": stage}, "settings": job.settings,
        "error": job.error, "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "options": job.options, "timings": job.timings, "links": links,
        "finished": job.status in FINISHED,
    }  # fmt: skip


def job_file(results_dir: Path, job_id: str, name: str) -> FileResponse:
    """The response for one file of a job's folder; 404 when it is missing, not a regular file, or reached through
    a symbolic link (the job's folder or the file itself)."""
    fd = open_job_file(results_dir, job_id, name)
    if fd is None:
        raise HTTPException(404, "this file is no longer on the server")
    path = results_dir / job_id / name
    return OpenedFile(fd, path, media_type=MEDIA_TYPES.get(path.suffix.lstrip("."), "application/octet-stream"),
                      headers={"Cache-Control": "private, max-age=86400"})  # fmt: skip


def open_job_file(results_dir: Path, job_id: str, name: str) -> int | None:
    """A read descriptor for ``results_dir/job_id/name``, opened without following symbolic links below the results
    folder (each step opened relative to the last, so nothing can be swapped between a check and the open), or
    None. A FIFO, device or folder is refused without blocking."""
    if not JOB_ID.fullmatch(job_id) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        return None
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    opened: list[int] = []
    try:
        opened.append(os.open(results_dir, os.O_RDONLY | os.O_DIRECTORY))
        opened.append(os.open(job_id, nofollow | os.O_DIRECTORY, dir_fd=opened[-1]))
        fd = os.open(name, nofollow | os.O_NONBLOCK, dir_fd=opened[-1])
    except OSError:  # missing, a symbolic link (ELOOP), not a folder
        return None
    finally:
        for folder in opened:
            os.close(folder)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return fd


class OpenedFile(FileResponse):
    """starlette's FileResponse (ranges, ETag) over a file already opened and checked: what it sends is read from
    that descriptor (starlette's ``_open_file`` hook; with a starlette without it the path is opened again), never
    from whatever the path names by then."""

    def __init__(self, fd: int, path: Path, **kwargs: Any) -> None:
        self.handle = os.fdopen(fd, "rb")
        super().__init__(path, stat_result=os.fstat(fd), **kwargs)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        extensions = {k: v for k, v in scope.get("extensions", {}).items() if k != "http.response.pathsend"}
        try:  # no "pathsend": the server would open the path itself
            await super().__call__({**scope, "extensions": extensions}, receive, send)
        finally:
            self.handle.close()

    @contextlib.asynccontextmanager
    async def _open_file(self) -> Any:
        self.handle.seek(0)
        yield anyio.wrap_file(self.handle)
