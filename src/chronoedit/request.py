"""Validate a pipeline call's arguments into one normalised request, with one clear message per problem.

Each problem is a :class:`~chronoedit.errors.UserError` whose ``field`` is the pipeline argument it is about
(``guidance_scale``, ``num_frames``, ...); the messages name arguments as ``{name}`` placeholders, so each front end
shows them in its own words (``--guidance_scale`` on the command line).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

from . import rules
from .encoders import TEXT_TOKENS
from .errors import UserError
from .latents import latent_frames
from .media import to_rgb
from .reasoning import ReasoningPlan
from .rules import is_int as _is_int
from .sizing import auto_size

OUTPUT_TYPES = ("np", "pt", "pil", "latent")


@dataclass
class EditRequest:
    image: PIL.Image.Image
    prompts: list[str]
    negative_prompts: list[str]
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    num_videos_per_prompt: int
    generator: torch.Generator | list[torch.Generator] | None
    latents: torch.Tensor | None
    prompt_embeds: torch.Tensor | None
    negative_prompt_embeds: torch.Tensor | None
    output_type: str
    attention_kwargs: dict[str, Any] | None
    callback: Callable[..., dict[str, Any]] | None
    callback_tensor_inputs: tuple[str, ...]
    max_sequence_length: int
    reasoning: ReasoningPlan
    return_trajectory: bool

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0


def as_pil(image: Any) -> PIL.Image.Image:
    """PIL image (transparency composited on white, as the CLI does), HxWx3 array (uint8, or float in [0, 1]) or
    [1,]3xHxW tensor (in [0, 1], or in [-1, 1] when it has negative values, as diffusers accepts) -> RGB image."""
    if isinstance(image, PIL.Image.Image):
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 3 or image.shape[0] != 3:
            raise UserError(
                f"{{image}} tensor must be [3, H, W] or [1, 3, H, W], got shape {tuple(image.shape)}", field="image"
            )
        image = image.detach().float().cpu()
        if torch.isfinite(image).all() and image.min() < 0:
            image = (image + 1.0) / 2.0
        image = image.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"{{image}} array must be [H, W, 3], got shape {image.shape}", field="image")
        if image.dtype != np.uint8:
            if not np.isfinite(image).all():
                raise UserError("{image} array contains NaN or Inf", field="image")
            image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
        return PIL.Image.fromarray(image)
    raise UserError(
        f"{{image}} must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}", field="image"
    )


def check_inputs(
    pipe: Any,
    *,
    image: PIL.Image.Image | np.ndarray | torch.Tensor,
    prompt: str | list[str] | None,
    negative_prompt: str | list[str] | None,
    height: int | None,
    width: int | None,
    num_frames: int | None,
    num_inference_steps: int,
    guidance_scale: float,
    num_videos_per_prompt: int,
    generator: torch.Generator | list[torch.Generator] | None,
    latents: torch.Tensor | None,
    prompt_embeds: torch.Tensor | None,
    negative_prompt_embeds: torch.Tensor | None,
    output_type: str,
    attention_kwargs: dict[str, Any] | None,
    callback_on_step_end: Callable[..., dict[str, Any]] | None,
    callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] | None,
    max_sequence_length: int,
    enable_temporal_reasoning: bool,
    num_temporal_reasoning_steps: int | None,
    return_trajectory: bool,
) -> EditRequest:
    """All checks of a pipeline call (its arguments by name, as ``ChronoEditPipeline.__call__`` takes them), before
    any model runs. Raises a UserError naming the problem and the argument."""
    pil_image = as_pil(image)
    prompts, negatives = _check_prompts(prompt, prompt_embeds, negative_prompt)
    width, height = _check_size(pil_image, width, height, pipe)
    frames, plan = _check_frames(
        num_frames, num_inference_steps, bool(enable_temporal_reasoning), num_temporal_reasoning_steps,
        bool(return_trajectory),
    )  # fmt: skip
    _check_settings(guidance_scale, output_type, num_videos_per_prompt, max_sequence_length)
    tensor_inputs = tuple(callback_on_step_end_tensor_inputs or ())
    unknown = [k for k in tensor_inputs if k not in pipe._callback_tensor_inputs]
    if unknown:
        raise UserError(
            f"callback tensor inputs {unknown} are not among {list(pipe._callback_tensor_inputs)}",
            field="callback_on_step_end_tensor_inputs",
        )
    req = EditRequest(
        image=pil_image, prompts=prompts, negative_prompts=negatives, height=height, width=width,
        num_frames=frames, num_inference_steps=num_inference_steps, guidance_scale=float(guidance_scale),
        num_videos_per_prompt=num_videos_per_prompt, generator=generator, latents=latents,
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
        attention_kwargs=attention_kwargs, callback=callback_on_step_end, callback_tensor_inputs=tensor_inputs,
        max_sequence_length=max_sequence_length, reasoning=plan, return_trajectory=bool(return_trajectory),
    )  # fmt: skip
    _check_tensors(req, pipe)
    return req


def _check_settings(guidance_scale: Any, output_type: Any, videos_per_prompt: Any, max_sequence_length: Any) -> None:
    """The scalar settings that depend on nothing else."""
    rules.check_guidance(guidance_scale)
    if output_type not in OUTPUT_TYPES:
        raise UserError(
            f"{{output_type}} must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}", field="output_type"
        )
    if not _is_int(videos_per_prompt):
        raise UserError(
            f"{{num_videos_per_prompt}} must be a positive integer, got {videos_per_prompt!r}",
            field="num_videos_per_prompt",
        )
    if videos_per_prompt < 1:
        raise UserError(
            f"{{num_videos_per_prompt}} must be >= 1, got {videos_per_prompt}", field="num_videos_per_prompt"
        )
    if not _is_int(max_sequence_length) or not 1 <= max_sequence_length <= TEXT_TOKENS:
        raise UserError(
            f"{{max_sequence_length}} must be between 1 and {TEXT_TOKENS}, got {max_sequence_length}",
            field="max_sequence_length",
        )


def _check_prompts(
    prompt: str | list[str] | None, embeds: torch.Tensor | None, negative_prompt: str | list[str] | None
) -> tuple[list[str], list[str]]:
    if prompt is None and embeds is None:
        raise UserError("give a {prompt} (or {prompt_embeds})", field="prompt", also=("prompt_embeds",))
    if prompt is not None and embeds is not None:
        raise UserError("give either {prompt} or {prompt_embeds}, not both", field="prompt", also=("prompt_embeds",))
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else [""] * len(embeds)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError("{prompt} must be a string or a non-empty list of strings", field="prompt")
    negative = negative_prompt or ""
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts):
        raise UserError(
            f"{{negative_prompt}} has {len(negatives)} entries but {{prompt}} has {len(prompts)}",
            field="negative_prompt",
            also=("prompt",),
        )
    return prompts, negatives


def _check_size(image: PIL.Image.Image, width: int | None, height: int | None, pipe: Any) -> tuple[int, int]:
    """(width, height): both given, each a multiple of the VAE factor times the patch size; neither: the 720x1280
    area at the image's aspect ratio."""
    if width is None and height is None:
        return auto_size(*image.size)
    return rules.check_size(width, height, multiple=pipe.vae_spatial_factor * pipe.transformer.config.patch_size[1])


def _check_frames(
    num_frames: int | None, steps: int, reasoning: bool, reasoning_steps: int | None, return_trajectory: bool
) -> tuple[int, ReasoningPlan]:
    """num_frames and the reasoning plan by the shared rules; nothing is silently replaced. Without reasoning,
    ``num_temporal_reasoning_steps`` is ignored (as diffusers' pipeline does)."""
    steps = rules.check_steps(steps)
    num_frames, reasoning_steps = rules.resolve_frames(reasoning, num_frames, steps,
                                                       reasoning_steps if reasoning else None)  # fmt: skip
    if return_trajectory and reasoning_steps == 0:
        raise UserError("{return_trajectory} needs {enable_temporal_reasoning}=True and at least 1 reasoning step",
                        field="return_trajectory", also=("enable_temporal_reasoning",))  # fmt: skip
    plan = ReasoningPlan(num_inference_steps=steps, reasoning_steps=reasoning_steps, enabled=reasoning)
    return num_frames, plan


def _shape(value: Any) -> tuple[int, ...] | str:
    """A tensor's shape, or the type name of something that is no tensor."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_tensors(req: EditRequest, pipe: Any) -> None:
    """Shapes of user-given latents and embeddings."""
    batch = len(req.prompts)
    text_dim = pipe.transformer.config.text_dim
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        value = getattr(req, name)
        if value is not None and _shape(value) != (batch, TEXT_TOKENS, text_dim):
            raise UserError(f"{{{name}}} must be [{batch}, {TEXT_TOKENS}, {text_dim}], got {_shape(value)}", field=name)
    if isinstance(req.generator, list) and len(req.generator) != batch * req.num_videos_per_prompt:
        raise UserError(
            f"got {len(req.generator)} generators for {batch * req.num_videos_per_prompt} videos", field="generator"
        )
    if req.latents is not None:
        factor = pipe.vae_spatial_factor
        shape = (batch * req.num_videos_per_prompt, pipe.vae.config.z_dim, latent_frames(req.num_frames),
                 req.height // factor, req.width // factor)  # fmt: skip
        if _shape(req.latents) != shape:
            raise UserError(f"{{latents}} must have shape {shape}, got {_shape(req.latents)}", field="latents")
