"""The HTTP API and web UI of ``chronoedit serve`` (FastAPI).

- ``POST /v1/edits``: multipart ``image`` (file) + ``options`` (JSON, see :class:`EditOptions`) -> 202 and a job id
- ``GET /v1/edits/{id}``: status, queue position, progress (step/total), error, timings
- ``GET /v1/edits/{id}/result`` (the edited image), ``/trajectory`` (mp4), ``/trajectory-sheet`` (png), ``/input``,
  ``/prompt`` (the enhanced prompt, text)
- ``DELETE /v1/edits/{id}``: cancel a queued job
- ``GET /v1/health``, ``GET /v1/config`` (presets, limits, defaults for clients)
- ``/openapi.json`` and ``/docs`` (Swagger UI, working offline)
- ``/``: the web UI (static files shipped in the package)

Every error is JSON ``{"detail": "<one line>"}`` with a 4xx status for anything the client can fix.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError

from .. import __version__, media
from ..errors import UserError
from ..presets import PRESETS
from .editing import INPUT_NAME, BadImage, TooLarge, build_job, decode_upload, resolved_settings, with_seed
from .options import MEDIA_TYPES, EditOptions, Limits
from .store import FINISHED, QUEUED, RUNNING, Job, JobStore, QueueFull, new_job_id
from .worker import BROKEN, Worker

STATIC_DIR = Path(__file__).with_name("static")
JOB_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
FILE_ROLES = {
    "result": "result", "trajectory": "trajectory", "trajectory-sheet": "trajectory_sheet", "prompt": "prompt",
}  # fmt: skip


@dataclass
class ServerState:
    """Everything the routes need; built by :func:`chronoedit.commands.serve` or by tests."""

    store: JobStore
    worker: Worker
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
    _add_error_handlers(app)
    app.include_router(_api_routes(state))
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_validation(exc.errors())}, status_code=422)


def describe_validation(errors: Any) -> str:
    """pydantic / FastAPI validation errors as one line: ``where: what; where: what``."""
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def _api_routes(state: ServerState):  # type: ignore[no-untyped-def]
    from fastapi import APIRouter, Depends
    from fastapi.security import HTTPBearer

    # The token itself is checked by the guard middleware; this declares it, so /docs offers "Authorize".
    bearer = HTTPBearer(auto_error=False, description="the server's token, when it was started with one")
    router = APIRouter(prefix="/v1", dependencies=[Depends(bearer)])

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
        return _file(state.results_dir / job.id / INPUT_NAME)

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
        return _file(state.results_dir / job.id / name)

    @router.get("/health", summary="Liveness, model state and queue")
    def health() -> dict[str, Any]:
        counts = state.store.counts()
        worker = state.worker.describe()
        ok = worker["state"] != BROKEN and worker["alive"]
        return {"status": "ok" if ok else "error", "version": __version__, "model": state.model_name,
                "worker": worker, "queue": {"queued": counts[QUEUED], "running": counts[RUNNING],
                                            "limit": state.limits.max_queue}}  # fmt: skip

    @router.get("/config", summary="Presets, limits and defaults, for clients")
    def config() -> dict[str, Any]:
        presets = [{"name": p.name, "summary": p.summary, "num_inference_steps": p.num_inference_steps,
                    "guidance_scale": p.guidance_scale} for p in PRESETS.values()]  # fmt: skip
        return {"model": state.model_name, "presets": presets, "limits": asdict(state.limits),
                "defaults": state.defaults, "output_formats": ["png", "jpeg", "webp"],
                "prompt_enhancer": state.worker.enhancer is not None}  # fmt: skip

    return router


FORM_SLACK_BYTES = 1 << 20  # room for the options and the multipart framing beside the image


def _guard(state: ServerState):  # type: ignore[no-untyped-def]
    """HTTP middleware run before any body is read: with a token configured every /v1 route but /v1/health needs
    ``Authorization: Bearer`` (the upload size is :class:`BodyLimit`'s, inside it)."""

    async def guard(request: Request, call_next: Any) -> Any:
        path = request.url.path
        if state.token is not None and path.startswith("/v1/") and path != "/v1/health":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), state.token.encode()):
                return JSONResponse({"detail": "a valid bearer token is required (Authorization: Bearer <token>)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        return await call_next(request)

    return guard


def check_queue_room(state: ServerState) -> None:
    """429 when the queue is already full."""
    counts = state.store.counts()
    if counts[QUEUED] + counts[RUNNING] >= state.limits.max_queue:
        raise HTTPException(429, f"the queue is full (the limit is {state.limits.max_queue} jobs waiting or "
                                 "running); try again later", headers={"Retry-After": "10"})  # fmt: skip


def parse_options(text: str) -> EditOptions:
    """The ``options`` form field; 422 naming the bad field."""
    try:
        return EditOptions.model_validate_json(text)
    except ValidationError as exc:
        raise HTTPException(422, "options: " + describe_validation(exc.errors())) from None


class BodyLimit:
    """ASGI middleware for the upload's size: a Content-Length over the limit is answered 413 before any body is
    read; otherwise the bytes are counted as they arrive and 413 comes once they pass the limit, so a body without
    Content-Length (chunked) is never read, nor spooled to disk, beyond it."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/edits":
            return await self.app(scope, receive, send)
        allowed, seen = self.state.limits.max_upload_bytes + FORM_SLACK_BYTES, 0
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > allowed:
            too_large = JSONResponse({"detail": upload_too_large(self.state.limits.max_upload_bytes)}, status_code=413)
            return await too_large(scope, receive, send)

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if seen > allowed:  # raised inside FastAPI's form parsing, which passes HTTPExceptions on
                raise HTTPException(413, upload_too_large(self.state.limits.max_upload_bytes))
            return message

        await self.app(scope, counted, send)


def upload_too_large(limit: int) -> str:
    return f"the upload is over this server's limit of {limit} bytes"


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
    try:
        job_dir.mkdir(parents=True)
        media.save_image(image, job_dir / INPUT_NAME)
        edit, _plan = build_job(state.worker.runner.spec, state.worker.defaults, options, job_dir, state.limits)
        state.store.submit(
            options.model_dump(exclude_none=True),
            state.limits.max_queue,
            job_id=job_id,
            total=edit.num_inference_steps,
        )
    except QueueFull as exc:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise HTTPException(429, str(exc), headers={"Retry-After": "10"}) from None
    except UserError as exc:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise HTTPException(422, state.worker.public_error(exc)) from None
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    state.worker.wake()
    return describe_job(state, find_job(state, job_id)) | {"settings": resolved_settings(edit)}


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
    progress = state.worker.progress
    step, total, stage = job.step, job.total, None
    if job.status == RUNNING and progress is not None and progress.job_id == job.id:
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


def _file(path: Path) -> FileResponse:
    if not path.is_file():
        raise HTTPException(404, "this file is no longer on the server")
    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix.lstrip("."), "application/octet-stream"),
                        headers={"Cache-Control": "private, max-age=86400"})  # fmt: skip
