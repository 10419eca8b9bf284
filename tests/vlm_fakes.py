"""Test doubles for the VLM backends: an OpenAI-compatible HTTP server and a tiny random Qwen2.5-VL.

Imported by ``test_vlm.py``, ``test_enhance.py`` and ``test_label.py``. Nothing here downloads: the server is stdlib
``http.server`` on 127.0.0.1, and the tiny VLM is built from a config with a word-level tokenizer made on the spot.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

Responder = Callable[[dict[str, Any]], str]


# --------------------------------------------------------------------------------------------- the fake endpoint
class FakeOpenAIServer:
    """``POST /v1/chat/completions`` on a free port of 127.0.0.1, answered by ``respond(request_json)``.

    ``failures``: (status, message) answers given before any real one (with ``retry-after-ms: 10`` so the client's
    backoff stays short); ``delay``: seconds to wait before answering; ``api_key``: the only key accepted (401
    otherwise). Every request is recorded in ``requests`` (its JSON body plus ``_authorization``).
    """

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self.failures: list[tuple[int, str]] = []
        self.delay = 0.0
        self.api_key: str | None = None
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True  # a handler still sleeping (timeout tests) does not hold up close()
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def answer(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) for one request."""
        self.requests.append(request)
        if self.failures:
            status, message = self.failures.pop(0)
            return status, {"error": {"message": message, "type": "fake", "code": status}}
        if self.delay:
            time.sleep(self.delay)
        if self.api_key is not None and request["_authorization"] != f"Bearer {self.api_key}":
            return 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
        content = self.respond(request)
        return 200, {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": 0,
            "model": request.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip


def _handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path.rstrip("/") != "/v1/chat/completions":
                status, payload = 404, {"error": {"message": f"no route {self.path}"}}
            else:
                request = json.loads(body)
                request["_authorization"] = self.headers.get("authorization")
                status, payload = server.answer(request)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            if status != 200:
                self.send_header("retry-after-ms", "10")
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that timed out and left
                self.wfile.write(data)

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    return Handler


def system_text(request: dict[str, Any]) -> str:
    """The system prompt of a recorded request."""
    return next(m["content"] for m in request["messages"] if m["role"] == "system")


def user_text(request: dict[str, Any]) -> str:
    """The text parts of the user message of a recorded request."""
    user = next(m for m in request["messages"] if m["role"] == "user")
    return "\n".join(part["text"] for part in user["content"] if part["type"] == "text")


def user_images(request: dict[str, Any]) -> list[Image.Image]:
    """The images of the user message, decoded from their data URLs (which must be base64 PNG)."""
    user = next(m for m in request["messages"] if m["role"] == "user")
    images = []
    for part in user["content"]:
        if part["type"] == "image_url":
            url = part["image_url"]["url"]
            header, data = url.split(",", 1)
            assert header == "data:image/png;base64", header
            with Image.open(io.BytesIO(base64.b64decode(data))) as image:
                images.append(image.convert("RGB"))
    return images


# --------------------------------------------------------------------------------------------- the tiny local VLM
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
             "<|video_pad|>"]  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen_vl(folder: Path, family: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """A random-weight Qwen2.5-VL or Qwen3-VL (``family``; 1 text layer, 1 vision block, hidden 32, patch 4) with a
    character-level tokenizer, saved in the hub folder layout (weights, tokenizer, image processor, template)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    vocab = {token: i for i, token in enumerate([*_SPECIALS, *map(chr, range(32, 127)), "\n"])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.add_special_tokens(_SPECIALS)
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)  # fmt: skip
    image_processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64,
                                               max_pixels=32 * 32)  # fmt: skip
    ids = {"eos_token_id": vocab["<|im_end|>"], "pad_token_id": 0, "bos_token_id": 0}
    mrope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        rope_parameters=mrope,
        **ids,
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if family == "qwen3_vl":
        vision.update(deepstack_visual_indexes=[0], num_position_embeddings=16)
        mrope["mrope_interleaved"] = True
        names = ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor")
    else:
        vision.update(window_size=16, fullatt_block_indexes=[0])
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
        names = ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")
    config = getattr(transformers, names[0])(
        text_config=text, vision_config=vision, image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"], **ids,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # the same weights for a seed; the global RNG left as it was
        torch.manual_seed(seed)
        model = getattr(transformers, names[1])(config)
    model.generation_config.update(**ids)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": names[2]}))
    return folder


_TINY_DIRS: dict[str, Path] = {}


def tiny_qwen_vl_dir(family: str = "qwen2_5_vl") -> Path:
    """The tiny VLM folder of ``family``, built once per test process (in a temp folder removed at exit). Read-only."""
    if family not in _TINY_DIRS:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="chronoedit-tiny-vlm-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _TINY_DIRS[family] = build_tiny_qwen_vl(root / f"tiny-{family}", family)
    return _TINY_DIRS[family]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
