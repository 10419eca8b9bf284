"""A VLM behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, llama.cpp, Ollama, ...).

Uses the ``openai`` client (the ``[label]`` extra), which brings timeouts and retries with exponential backoff
(honouring ``Retry-After``). Images travel as lossless ``data:image/png;base64,...`` URLs. Every failure becomes one
:class:`VLMError` line naming the URL and the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from PIL import Image

from ..errors import one_line
from .base import BaseVLM, VLMConfig, VLMError, fit_image, image_data_url, strip_thinking

NO_KEY_PLACEHOLDER = "EMPTY"  # local servers (vLLM, SGLang, llama.cpp) accept any key
MAX_REASON = 300  # characters of a server's or library's error message shown in a VLMError


class OpenAIVLM(BaseVLM):
    """Chat with ``config.model`` at ``config.base_url``; the API key is read from ``$config.api_key_env``."""

    def __init__(self, config: VLMConfig) -> None:
        if not config.base_url:
            raise ValueError("an OpenAI-compatible VLM needs a base URL, e.g. http://localhost:8000/v1")
        try:
            import openai
        except ImportError as exc:
            raise VLMError(
                "an OpenAI-compatible VLM needs the 'openai' package: pip install 'chronoedit[label]'"
            ) from exc
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.name = f"model '{config.model}' at {self.base_url}"
        self._key_set = bool(os.environ.get(config.api_key_env))
        self._params: dict[str, Any] = {"max_tokens": config.max_new_tokens, "temperature": config.temperature}
        self._client: Any = openai.OpenAI(
            base_url=self.base_url,
            api_key=os.environ.get(config.api_key_env) or NO_KEY_PLACEHOLDER,
            timeout=config.timeout,
            max_retries=config.max_retries,
        )

    def chat(self, system: str, text: str, images: Sequence[Image.Image] = ()) -> str:
        """One chat turn: images (as data URLs) then text in the user message; thinking stripped from the answer."""
        if self._client is None:
            raise VLMError(f"{self.name}: the client was closed")
        import openai

        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": image_data_url(fit_image(image, self.config.max_image_pixels))}}
            for image in images
        ]
        content.append({"type": "text", "text": text})
        messages = [{"role": "system", "content": system}, {"role": "user", "content": content}]
        try:
            response = self._create(messages)
        except openai.OpenAIError as exc:
            raise VLMError(describe_error(exc, self)) from exc
        return self._answer(response)

    def _create(self, messages: list[dict[str, Any]]) -> Any:
        """``chat.completions.create``; a 400 that refuses ``max_tokens`` or ``temperature`` (OpenAI's reasoning
        models) is answered once by sending ``max_completion_tokens`` / no temperature, remembered for later calls."""
        import openai

        while True:
            try:
                return self._client.chat.completions.create(model=self.config.model, messages=messages,
                                                            **self._params)  # fmt: skip
            except openai.BadRequestError as exc:
                if not self._adapt(_server_message(exc).lower()):
                    raise

    def _adapt(self, message: str) -> bool:
        """Drop the parameter the server refused; False when there is nothing left to adapt."""
        if "max_tokens" in self._params and "max_tokens" in message and "max_completion_tokens" in message:
            self._params["max_completion_tokens"] = self._params.pop("max_tokens")
            return True
        if "temperature" in self._params and "temperature" in message:
            del self._params["temperature"]
            return True
        return False

    def _answer(self, response: Any) -> str:
        """The first choice's text, thinking stripped; VLMError when there is none."""
        choices = getattr(response, "choices", None) or []
        message = getattr(choices[0], "message", None) if choices else None
        answer = strip_thinking(self._text(getattr(message, "content", None)))
        if not answer:
            reason = getattr(choices[0], "finish_reason", None) if choices else "no choices"
            hint = f" (raise {_flag(self.config, 'max_tokens')})" if reason == "length" else ""
            raise VLMError(f"{self.name} returned an empty answer (finish reason: {reason}){hint}")
        return answer

    def _text(self, content: Any) -> str:
        """A message's content as text: a string, or the text parts of a list of parts (some servers answer with
        ``[{"type": "text", "text": ...}]``); VLMError for anything else."""
        if content is None or isinstance(content, str):
            return content or ""
        if isinstance(content, list):
            parts = [part.get("text") if isinstance(part, dict) else getattr(part, "text", None) for part in content]
            if all(isinstance(part, str) or part is None for part in parts):
                return "".join(part for part in parts if part)
        raise VLMError(f"{self.name} answered with content that is not text (a JSON {type(content).__name__} "
                       f"{str(content)[:80]!r})")  # fmt: skip

    def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            self._client.close()
            self._client = None


def describe_error(exc: Exception, vlm: OpenAIVLM) -> str:
    """One line for an ``openai`` exception, naming URL and model and saying what to do."""
    import openai

    config, name = vlm.config, vlm.name
    retries = f" (after {config.max_retries} retries)" if config.max_retries else ""
    if isinstance(exc, openai.APITimeoutError):
        flag = _flag(config, "timeout")
        return f"{name}: no answer within {config.timeout:g} s{retries}; raise {flag} or check the server"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = f" ({_short(cause)})" if cause is not None else ""
        return f"cannot reach {vlm.base_url}{detail}{retries}: is the server running and the base URL right?"
    if isinstance(exc, openai.APIStatusError):
        status, server = exc.status_code, _server_message(exc)
        if status in (401, 403):
            key = f"${config.api_key_env} is {'set but rejected' if vlm._key_set else 'not set'}"
            return f"{name}: authentication failed (HTTP {status}: {server}); {key}"
        if status == 404:
            return f"{name}: not found (HTTP 404: {server}); check the model name and that the base URL ends in /v1"
        if status == 429:
            return f"{name}: rate limited (HTTP 429: {server}){retries}"
        if status == 400 and "image" in server.lower() and "at most" in server.lower():
            return f"{name}: HTTP 400: {server} (for vLLM pass --limit-mm-per-prompt '{{\"image\": 2}}')"
        return f"{name}: HTTP {status}: {server}{retries if status >= 500 else ''}"
    return f"{name}: {_short(exc)}"


def _server_message(exc: Any) -> str:
    """The error message in the server's JSON body, else the exception text."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            return _short(message)
    return _short(getattr(exc, "message", None) or exc)


def _flag(config: VLMConfig, name: str) -> str:
    """The command-line flag of one of the VLM's settings: ``--vlm-timeout`` (``--prompt-enhancer-timeout`` ...)."""
    return "--" + config.field_of(name).replace("_", "-")


def _short(value: object) -> str:
    """An exception (:func:`~chronoedit.errors.one_line`) or a server's message on one line, cut to
    :data:`MAX_REASON` characters."""
    text = one_line(value) if isinstance(value, BaseException) else " ".join(str(value).split())
    return text[:MAX_REASON] + ("…" if len(text) > MAX_REASON else "")
