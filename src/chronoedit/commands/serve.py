"""``chronoedit serve``: keep the model loaded and serve edits over HTTP (API + web UI), with a persistent queue.

See :mod:`chronoedit.serve`. The server's flags set the model and every job's defaults; clients choose per-job
options within the limits.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..editing import resolve_sampling
from ..errors import UserError
from ..files import writing
from .edit import console_report
from .enhance import ENHANCER_PREFIX
from .flags import add_lora_args, add_runtime_args, add_sampling_args, edit_settings, model_spec

TOKEN_ENV = "CHRONOEDIT_API_TOKEN"
EPILOG = f"""\
API: POST /v1/edits (multipart: image file + options JSON) -> job id; GET /v1/edits/ID (status, progress);
GET /v1/edits/ID/result (edited image), /trajectory (mp4), /trajectory-sheet (png); DELETE /v1/edits/ID (cancel a
queued job); GET /v1/health; GET /v1/config; OpenAPI at /openapi.json and /docs. Web UI at /.

state: the queue is a SQLite file (--db, default STATE/jobs.sqlite3); uploads and results live in STATE/results/ID/.
Queued and finished jobs survive a restart; a job that was running when the process died is run again. Finished
jobs stay until deleted by hand, or --keep-results-hours after they finish.

prompt enhancer: with --prompt-enhancer-base-url URL --prompt-enhancer-model NAME (an OpenAI-compatible endpoint,
e.g. vLLM serving Qwen3-VL), requests may set enhance_prompt; the rewritten prompt is at /v1/edits/ID/prompt.

auth: set ${TOKEN_ENV} (or the variable named by --token-env) to require "Authorization: Bearer <token>" on every
/v1 route but /v1/health. Without it anyone who can reach the port can submit edits; results are reachable only by
their unguessable job id."""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand; the parsed arguments carry :func:`handle` as ``handler``."""
    parser = subparsers.add_parser(
        "serve", help="serve edits over HTTP: API, persistent job queue and web UI",
        description="Keep the model loaded and run edits submitted over HTTP, one at a time, in order.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    group.add_argument("--state-dir", type=Path, default=Path("chronoedit-serve"), metavar="DIR",
                       help="queue database and results (default ./chronoedit-serve)")  # fmt: skip
    group.add_argument("--db", type=Path, metavar="PATH", help="job queue database (default STATE/jobs.sqlite3)")
    group.add_argument("--devices", metavar="LIST",
                       help="one worker process per device, each with its own model, all taking jobs from the one "
                            "queue, e.g. cuda:0,cuda:1 (cpu may repeat: cpu,cpu); default: one worker in the "
                            "server's process on --device")  # fmt: skip
    group.add_argument("--token-env", default=TOKEN_ENV, metavar="VAR",
                       help=f"environment variable holding the bearer token (default {TOKEN_ENV})")  # fmt: skip
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB", help="upload size (20)")
    limits.add_argument("--max-input-pixels", type=int, default=4096 * 4096, metavar="N",
                        help="pixels of an uploaded image (4096*4096)")  # fmt: skip
    limits.add_argument("--max-queue", type=int, default=100, metavar="N",
                        help="queued + running jobs; more get 429 (100)")  # fmt: skip
    limits.add_argument("--max-steps", type=int, default=100, metavar="N", help="steps per job (100)")
    limits.add_argument("--max-reasoning-steps", type=int, default=100, metavar="N",
                        help="temporal reasoning steps per job (100)")  # fmt: skip
    limits.add_argument("--keep-results-hours", type=float, default=None, metavar="H",
                        help="delete finished jobs (record, input, outputs) H hours after they finish "
                             "(default: keep them)")  # fmt: skip
    limits.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="a client has SECONDS for its request's headers and for each part of an upload "
                             "(which must also keep up a minimum pace); slower clients get 408 (30)")  # fmt: skip
    parser.add_argument("--negative-prompt", metavar="TEXT", default=None, help="default negative prompt")
    add_sampling_args(parser)
    add_runtime_args(parser)
    add_lora_args(parser)
    from ..vlm.cli import add_vlm_args

    add_vlm_args(parser, prefix=ENHANCER_PREFIX, title="prompt enhancer (for requests with enhance_prompt)",
                 endpoint_only=True)  # a local VLM would share the GPU with the edit model on every job
    parser.set_defaults(handler=handle)
    for action in parser._actions:  # a server's jobs are seeded at random unless --seed fixes them
        if action.dest == "seed":
            action.help = "seed of jobs that give none (default: a random seed per job, shown in its settings)"
    return parser


def handle(args: argparse.Namespace) -> int:
    """Build the server and run it until interrupted."""
    try:
        import uvicorn
    except ImportError as exc:
        raise UserError("chronoedit serve needs the serve extra: pip install 'chronoedit[serve]'") from exc
    limits = _limits(args)  # every number checked before any work
    _check_port(args.host, args.port)  # before anything loads or is printed
    state = build_state(args)
    from ..serve.app import create_app
    from ..serve.guards import http_protocol

    app = create_app(state)
    auth = "bearer token required" if state.token else f"no auth (set {args.token_env} to require a token)"
    queued = state.store.counts()["queued"]
    url = f"http://{_url_host(args.host)}:{args.port}/"
    print(f"chronoedit serve: {url} ({state.model_name}; {auth}; queue {state.store.path}, {queued} queued)",
          file=sys.stderr, flush=True)  # fmt: skip
    if not state.token and not _is_loopback(args.host):
        print(f"chronoedit: warning: listening on {args.host} without a token", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                http=http_protocol(limits.read_timeout_s))  # fmt: skip
    return 0


def build_state(args: argparse.Namespace) -> Any:
    """Check the flags, open the queue and make the (not yet started) worker."""
    from ..editing import EditRunner
    from ..serve.app import ServerState
    from ..serve.child import ChildConfig
    from ..serve.pool import WorkerPool
    from ..serve.store import JobStore
    from ..serve.worker import Worker

    limits = _limits(args)
    devices = _devices(args)
    spec = model_spec(args if devices is None else argparse.Namespace(**{**vars(args), "device": devices[0]}))
    defaults = edit_settings(args)  # every job's settings before its options
    sampling = resolve_sampling(defaults, spec)  # every server-wide flag checked before the model loads
    if sampling.num_inference_steps > limits.max_steps:
        raise UserError(f"the server's {sampling.num_inference_steps} denoising steps per job (--num-inference-steps "
                        f"or the preset's) are over --max-steps {limits.max_steps}")  # fmt: skip
    enhancer = _enhancer(args)
    token = _token(args.token_env)
    results = args.state_dir / "results"
    with writing(results, "create the results folder"):  # a read-only state folder fails here, at start
        results.mkdir(parents=True, exist_ok=True)
    store = JobStore(args.db or args.state_dir / "jobs.sqlite3")
    if store.requeued:
        print(f"chronoedit serve: re-queued {store.requeued} job(s) interrupted by the last shutdown", file=sys.stderr)
    redact = _private_folders(args.state_dir, spec)
    if devices is None:
        # Notes (the demo model's) on stderr; no progress bar: a server's log is no terminal.
        runner = EditRunner(spec, report=dataclasses.replace(console_report(quiet=True), progress_bar=False))
        worker: Any = Worker(store, runner, defaults, results, limits, enhancer=enhancer, redact=redact)
    else:
        config = ChildConfig(index=0, spec=spec, db_path=store.path, defaults=defaults, results_dir=results,
                             limits=limits, enhancer=enhancer, redact=redact)  # fmt: skip
        worker = WorkerPool(store, config, devices)
    client_defaults = {"num_inference_steps": sampling.num_inference_steps, "guidance_scale": sampling.guidance_scale,
                       "flow_shift": sampling.flow_shift, "width": defaults.width, "height": defaults.height,
                       "max_area": sampling.max_area, "seed": defaults.seed}  # fmt: skip
    return ServerState(store=store, worker=worker, results_dir=results, limits=limits, token=token,
                       model_name=Path(spec.model_path).name, defaults=client_defaults)  # fmt: skip


def _devices(args: argparse.Namespace) -> list[str] | None:
    """The devices of ``--devices`` (one worker process each), checked; None without it (one worker thread)."""
    if args.devices is None:
        return None
    if args.device is not None:
        raise UserError("give --device (one worker in the server's process) or --devices (a worker process per "
                        "device), not both")  # fmt: skip
    from ..serve.pool import parse_devices

    return parse_devices(args.devices)


def _private_folders(state_dir: Path, spec: Any) -> dict[str, Path]:
    """Server folders never shown to clients, by placeholder: the state folder, the model, the transformer and the
    LoRAs' folders (as given and resolved; never /)."""
    private = {"<state>": state_dir}
    if not spec.is_demo:
        private["<model>"] = Path(spec.model_path)
        if not private["<model>"].is_dir():  # a hub id: its files live in the hub cache
            from huggingface_hub.constants import HF_HUB_CACHE

            private["<hub-cache>"] = Path(HF_HUB_CACHE)
    if spec.transformer is not None:
        private["<transformer>"] = spec.transformer
    folders = [folder for lora in spec.loras for folder in (lora.path.absolute().parent, lora.path.resolve().parent)]
    for i, folder in enumerate(f for f in dict.fromkeys(folders) if f.parent != f):
        private["<loras>" if i == 0 else f"<loras-{i + 1}>"] = folder
    return private


def _enhancer(args: argparse.Namespace) -> Any:
    """The prompt enhancer's VLM config: an OpenAI-compatible endpoint, or None when not configured."""
    from ..vlm.cli import vlm_config_from_args

    if args.prompt_enhancer_base_url is None:
        if args.prompt_enhancer_model is not None:
            raise UserError(
                "chronoedit serve runs the prompt enhancer through an endpoint: give --prompt-enhancer-base-url "
                "(a local VLM would have to share the GPU with the editing model for every job)"
            )
        return None
    return vlm_config_from_args(args, prefix=ENHANCER_PREFIX)


def _token(variable: str) -> str | None:
    """The bearer token from the environment variable ``variable`` (None when it is not set); a UserError when it is
    set but empty or whitespace, or has whitespace around it (no client could send it)."""
    token = os.environ.get(variable)
    if token is None:
        return None
    if not token.strip():
        raise UserError(f"${variable} is set but holds no token: set a token, or unset it to run without one")
    if token != token.strip():
        raise UserError(f"the token in ${variable} starts or ends with whitespace, which no client can send")
    return token


_POSITIVE = ("max_upload_mb", "max_input_pixels", "max_queue", "max_steps", "max_reasoning_steps",
             "keep_results_hours", "read_timeout")  # fmt: skip


def _limits(args: argparse.Namespace) -> Any:
    """The server's limits from its flags: each a finite number above 0 (one-line UserError naming the flag)."""
    from ..serve.options import Limits

    for flag in _POSITIVE:
        value = getattr(args, flag)
        if value is not None and not (value > 0 and (isinstance(value, int) or math.isfinite(value))):  # NaN, inf
            raise UserError(f"--{flag.replace('_', '-')} must be a positive number, got {value}")
    upload = int(args.max_upload_mb * 1024 * 1024)
    if upload < 1:
        raise UserError(f"--max-upload-mb {args.max_upload_mb} is under one byte")
    return Limits(max_upload_bytes=upload, max_input_pixels=args.max_input_pixels, max_queue=args.max_queue,
                  max_steps=args.max_steps, max_reasoning_steps=args.max_reasoning_steps,
                  keep_results_hours=args.keep_results_hours, read_timeout_s=args.read_timeout)  # fmt: skip


def _check_port(host: str, port: int) -> None:
    """UserError when ``port`` is not a port number or ``host:port`` cannot be listened on (in use, no such
    address, not allowed)."""
    import socket

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        socket.create_server((host, port), family=family).close()
    except OSError as err:
        raise UserError(f"cannot listen on {_url_host(host)}:{port}: {err.strerror or err}") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
