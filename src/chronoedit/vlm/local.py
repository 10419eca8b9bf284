"""A local transformers VLM (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, or any image-text-to-text model).

``AutoProcessor`` + ``AutoModelForImageTextToText`` from a folder or hub id, on the device and dtype asked for,
greedy decoding by default. :meth:`LocalVLM.close` deletes the model and empties the CUDA cache, so the editing model
that loads next has the memory. When torchvision is missing (transformers needs it for the Qwen *video* processors),
the model's processor is built without its video part: images and text work the same.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..devices import DTYPE_NAMES, default_dtype, resolve_device, torch_dtype
from ..errors import UserError, one_line
from .base import BaseVLM, VLMConfig, VLMError, fit_image, strip_thinking

MAX_REASON = 400  # characters of a library's error message shown in a VLMError


def device_and_dtype(config: VLMConfig) -> tuple[str, str]:
    """(device, dtype): cuda if available else cpu (``auto``: spread over GPUs); bf16 on GPU, fp32 on CPU.
    UserError naming the setting (``vlm_device``, ``vlm_dtype``) for a device or dtype this machine lacks."""
    device = resolve_device(config.device, field=config.field_of("device"), allow_auto=True)
    dtype = config.dtype
    if dtype is not None and dtype not in DTYPE_NAMES:
        field = config.field_of("dtype")
        raise UserError(f"unknown {{{field}}} {dtype!r}: use one of {', '.join(sorted(DTYPE_NAMES))}", field)
    return device, dtype or default_dtype(device)


class LocalVLM(BaseVLM):
    """A transformers image-text-to-text model loaded from ``config.model``."""

    def __init__(self, config: VLMConfig) -> None:
        self.config = config
        self.device, self.dtype = device_and_dtype(config)
        self.name = f"local VLM {config.model} ({self.dtype}, {self.device})"
        _check_model_location(config.model)
        self.processor: Any = load_processor(config.model)
        self.model: Any = _load_model(config.model, self.device, torch_dtype(self.dtype))

    def chat(self, system: str, text: str, images: Sequence[Image.Image] = ()) -> str:
        """One chat turn: the images then the text in the user message; greedy unless a temperature is set."""
        import torch

        if self.model is None:
            raise VLMError(f"{self.name}: the model was released (close() was called)")
        pictures = [fit_image(image, self.config.max_image_pixels) for image in images]
        messages = [
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [*({"type": "image"} for _ in pictures), {"type": "text", "text": text}]},
        ]
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[prompt], images=pictures or None, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if self.config.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.config.temperature}
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.config.max_new_tokens, **sampling)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answer = strip_thinking(self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0])
        if not answer:
            raise VLMError(f"{self.name} returned an empty answer")
        return answer

    def close(self) -> None:
        """Delete the model, collect garbage and empty the CUDA cache."""
        if self.model is None:
            return
        self.model = None
        self.processor = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _check_model_location(model: str) -> None:
    """A local path must exist; ``owner/name`` is left to the hub (cache) loader."""
    from ..loading import looks_like_repo_id

    if not Path(model).expanduser().exists() and not looks_like_repo_id(model):
        raise VLMError(f"VLM model folder not found: {model} (give a local folder or a hub id like Qwen/Qwen3-VL-8B)")


def load_processor(model: str) -> Any:
    """``AutoProcessor`` for ``model``; without torchvision, the same processor class minus its video processor."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise VLMError(f"cannot load the processor of {model}: {_reason(exc)}") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise VLMError(f"cannot load the processor of {model}: {_reason(exc)}") from exc
    try:
        return _image_only_processor(model)
    except VLMError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise VLMError(f"cannot load the processor of {model}: {_reason(exc)}") from exc


def _image_only_processor(model: str) -> Any:
    """The model's processor class without its ``video_processor`` attribute (the part that needs torchvision)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(model).model_type
    base = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type) or "", None)
    if base is None:
        raise VLMError(f"cannot load the processor of {model}: it needs torchvision (pip install torchvision)")

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [name for name in super().get_attributes() if name != "video_processor"]

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = base.__name__
    return ImageOnlyProcessor.from_pretrained(model)


def _load_model(model: str, device: str, dtype: Any) -> Any:
    """``AutoModelForImageTextToText`` in ``dtype``, loaded straight onto ``device`` (``auto``: spread over the GPUs
    by accelerate), in eval mode."""
    from transformers import AutoModelForImageTextToText

    try:
        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, device_map=device)
    except (OSError, ValueError, KeyError) as exc:
        raise VLMError(f"cannot load the VLM {model}: {_reason(exc)}") from exc
    return loaded.eval()


def _reason(exc: BaseException) -> str:
    """A library's error on one line, cut to :data:`MAX_REASON` characters."""
    return one_line(exc)[:MAX_REASON]
