"""The backend protocol every vision-language model (VLM) backend follows, and helpers they share.

A backend answers one chat turn: a system prompt, a user text and zero or more images in; the answer text out.
Backends are context managers: ``with load_vlm(config) as vlm: vlm.chat(...)`` releases the model (or the HTTP client)
on exit, so a large local VLM is gone before the next model loads.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image

from ..errors import UserError

DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024
DEFAULT_MAX_NEW_TOKENS = 1024
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)


class VLMError(UserError):
    """A VLM backend failed (unreachable server, bad key, model that cannot be loaded, empty answer, ...): the user's
    endpoint or model, not a bug.

    The message is one line that names the backend (URL and model, or the model folder).
    """


@runtime_checkable
class VLM(Protocol):
    """A vision-language model that answers one chat turn."""

    name: str  # how errors and logs name it, e.g. "Qwen/Qwen3-VL-8B-Instruct on cuda" or "gpt-4o at https://..."

    def chat(self, system: str, text: str, images: Sequence[Image.Image] = ()) -> str:
        """Answer one user turn (``images`` first, then ``text``) under the ``system`` prompt; thinking stripped."""
        ...

    def close(self) -> None:
        """Release the model / client; the backend cannot be used afterwards. Safe to call twice."""
        ...

    def __enter__(self) -> VLM: ...

    def __exit__(self, *exc: object) -> None: ...


@dataclass
class VLMConfig:
    """Which VLM to use and how; ``base_url`` set means an OpenAI-compatible endpoint, else a local model.

    ``model`` is a local folder or hub id (local backend) or the served model's name (endpoint). ``device`` and
    ``dtype`` only apply locally; ``api_key_env``, ``timeout`` and ``max_retries`` only to endpoints.
    ``temperature`` 0 means greedy decoding. ``field_prefix`` is how errors name the settings (``vlm`` ->
    ``vlm_device``, ``vlm_timeout``; ``prompt_enhancer`` for ``chronoedit edit``), as the command-line flags do.
    """

    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    device: str | None = None
    dtype: str | None = None
    timeout: float = 120.0
    max_retries: int = 3
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    field_prefix: str = "vlm"

    def where(self) -> str:
        """``MODEL at URL`` for an endpoint, ``local MODEL`` otherwise (for stage messages)."""
        return f"{self.model} at {self.base_url}" if self.base_url else f"local {self.model}"

    def __post_init__(self) -> None:
        field = self.field_of
        if not self.model or not self.model.strip():
            raise UserError("the VLM model name is empty", field("model"))
        if self.timeout <= 0 or not math.isfinite(self.timeout):
            raise UserError(f"the VLM timeout must be a positive number of seconds, got {self.timeout}",
                            field("timeout"))  # fmt: skip
        if self.max_retries < 0:
            raise UserError(f"the VLM max retries must be >= 0, got {self.max_retries}", field("max_retries"))
        if self.max_new_tokens < 1:
            raise UserError(f"the VLM max new tokens must be >= 1, got {self.max_new_tokens}", field("max_tokens"))
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise UserError(f"the VLM temperature must be >= 0, got {self.temperature}", field("temperature"))
        if self.max_image_pixels < 28 * 28:
            raise UserError(f"the VLM max image pixels must be at least 784, got {self.max_image_pixels}",
                            field("max_image_pixels"))  # fmt: skip

    def field_of(self, name: str) -> str:
        """The error field of one of this VLM's settings: ``device`` -> ``vlm_device`` (the flag --vlm-device)."""
        return f"{self.field_prefix}_{name}"


class BaseVLM:
    """Context-manager plumbing shared by the backends."""

    name = "vlm"

    def close(self) -> None:  # pragma: no cover - overridden
        """Release resources."""

    def __enter__(self) -> BaseVLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def strip_thinking(text: str) -> str:
    """Drop reasoning models' ``<think>…</think>`` blocks, anything before a lone ``</think>`` (the template opened
    it) and an unclosed ``<think>`` to the end (the answer ran out of tokens while thinking)."""
    text = _THINK_BLOCK.sub("", text)
    text = _THINK_CLOSE.split(text)[-1]
    return _THINK_OPEN.split(text)[0].strip()


def fit_image(image: Image.Image, max_pixels: int) -> Image.Image:
    """RGB ``image`` downscaled (aspect kept, Lanczos) to at most ``max_pixels`` pixels; small images unchanged."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def image_data_url(image: Image.Image) -> str:
    """The image as a ``data:image/png;base64,...`` URL (lossless, as OpenAI-compatible servers accept)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
