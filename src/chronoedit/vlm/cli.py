"""Command-line flags that choose a VLM, shared by ``chronoedit enhance``, ``label`` and ``edit``.

``--PREFIX-model`` names a local folder / hub id, or with ``--PREFIX-base-url`` the model an OpenAI-compatible server
serves. The prefix is ``vlm`` for ``enhance`` and ``label`` and ``prompt-enhancer`` for ``edit`` (NVIDIA's flag name).
"""

from __future__ import annotations

import argparse

from ..devices import DTYPE_NAMES
from ..errors import UserError
from .base import DEFAULT_MAX_NEW_TOKENS, VLMConfig

DEFAULT_VLM_MODEL = "Qwen/Qwen3-VL-30B-A3B-Instruct"  # NVIDIA's default prompt enhancer


def add_vlm_args(parser: argparse.ArgumentParser, prefix: str = "vlm", title: str = "vision-language model",
                 group: argparse._ArgumentGroup | None = None,
                 endpoint_only: bool = False) -> argparse._ArgumentGroup:  # fmt: skip
    """Add ``--PREFIX-model``, ``--PREFIX-base-url`` and the backend knobs as one argument group (a new one titled
    ``title``, or ``group``); returns the group. ``endpoint_only``: no local-model flags (device, dtype)."""
    group = group if group is not None else parser.add_argument_group(title)
    flag = f"--{prefix}"
    served = f"the model name the endpoint of {flag}-base-url serves"
    local = f"local model folder or hub id of a Qwen2.5-VL / Qwen3-VL class model (default {DEFAULT_VLM_MODEL}), or "
    group.add_argument(f"{flag}-model", metavar="MODEL", default=None,
                       help=served if endpoint_only else local + served)  # fmt: skip
    group.add_argument(
        f"{flag}-base-url", metavar="URL", default=None,
        help=("an" if endpoint_only else "use an") + " OpenAI-compatible chat-completions endpoint"
        + ("" if endpoint_only else " instead of a local model") + ", e.g. http://localhost:8000/v1 (vLLM, SGLang, "
        "llama.cpp, Ollama) or https://api.openai.com/v1",
    )  # fmt: skip
    group.add_argument(f"{flag}-api-key-env", metavar="VAR", default="OPENAI_API_KEY",
                       help="environment variable holding the endpoint's API key (OPENAI_API_KEY; may be unset "
                       "for local servers)")  # fmt: skip
    if not endpoint_only:
        group.add_argument(f"{flag}-device", metavar="DEVICE", default=None,
                           help="device of a local model: cuda, cuda:1, cpu or auto (spread over GPUs)")  # fmt: skip
        group.add_argument(f"{flag}-dtype", choices=DTYPE_NAMES, default=None,
                           help="dtype of a local model (bf16 on GPU, fp32 on CPU)")  # fmt: skip
    group.add_argument(f"{flag}-timeout", type=float, metavar="SECONDS", default=120.0,
                       help="endpoint request timeout (120)")  # fmt: skip
    group.add_argument(
        f"{flag}-max-retries",
        type=int,
        metavar="N",
        default=3,
        help="endpoint retries with exponential backoff on connection errors, 429 and 5xx (3)",
    )
    group.add_argument(
        f"{flag}-max-tokens",
        type=int,
        metavar="N",
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"longest answer in tokens ({DEFAULT_MAX_NEW_TOKENS}; reasoning models need more)",
    )
    return group


def vlm_config_from_args(args: argparse.Namespace, prefix: str = "vlm") -> VLMConfig:
    """The :class:`VLMConfig` the flags of :func:`add_vlm_args` describe."""
    dest = prefix.replace("-", "_")

    def value(name: str) -> object:
        return getattr(args, f"{dest}_{name}", None)  # device and dtype are absent with endpoint_only

    base_url = value("base_url")
    model = value("model")
    if base_url and not model:
        raise UserError(f"--{prefix}-base-url needs --{prefix}-model: the name of the model the server serves",
                        f"{dest}_base_url", (f"{dest}_model",))  # fmt: skip
    return VLMConfig(
        model=model or DEFAULT_VLM_MODEL,
        base_url=base_url,
        api_key_env=value("api_key_env"),
        device=value("device"),
        dtype=value("dtype"),
        timeout=value("timeout"),
        max_retries=value("max_retries"),
        max_new_tokens=value("max_tokens"),
        field_prefix=dest,
    )
