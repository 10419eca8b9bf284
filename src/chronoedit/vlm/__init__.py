"""Vision-language model (VLM) backends shared by the prompt enhancer, the labeler and evaluation.

``load_vlm(VLMConfig(model=..., base_url=...))`` picks the backend: a base URL means any OpenAI-compatible
chat-completions endpoint (:mod:`.openai_api`), otherwise a local transformers model (:mod:`.local`). Backends import
their heavy libraries only when created, so importing this package is cheap. :mod:`.cli` adds the shared flags.
"""

from __future__ import annotations

from .base import VLM, BaseVLM, VLMConfig, VLMError, fit_image, image_data_url, strip_thinking

__all__ = ["VLM", "BaseVLM", "VLMConfig", "VLMError", "fit_image", "image_data_url", "load_vlm", "strip_thinking"]


def load_vlm(config: VLMConfig) -> VLM:
    """The backend for ``config``: OpenAI-compatible when ``config.base_url`` is set, else a local model."""
    if config.base_url:
        from .openai_api import OpenAIVLM

        return OpenAIVLM(config)
    from .local import LocalVLM

    return LocalVLM(config)
