"""Validate a pipeline call's arguments into one normalised request, with one clear message per problem."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

from .encoders import TEXT_TOKENS
from .io import auto_size, to_rgb
from .latents import latent_frames
from .reasoning import ReasoningPlan

PLAIN_EDIT_FRAMES = 5
REASONING_FRAMES = 29
MIN_REASONING_FRAMES = 9  # 3 latent frames: at least one reasoning frame between the input and the edit
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
            raise ValueError(f"image tensor must be [3, H, W] or [1, 3, H, W], got shape {tuple(image.shape)}")
        image = image.detach().float().cpu()
        if torch.isfinite(image).all() and image.min() < 0:
            image = (image + 1.0) / 2.0
        image = image.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be [H, W, 3], got shape {image.shape}")
        if image.dtype != np.uint8:
            if not np.isfinite(image).all():
                raise ValueError("image array contains NaN or Inf")
            image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
        return PIL.Image.fromarray(image)
    raise ValueError(f"image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")


def check_inputs(pipe: Any, args: dict[str, Any]) -> EditRequest:
    """All checks of a pipeline call, before any model runs. Raises ValueError naming the problem."""
    image = as_pil(args["image"])
    prompts, negatives = _check_prompts(args)
    width, height = _check_size(image, args["width"], args["height"], pipe)
    num_frames, plan = _check_frames(args)
    output_type = args["output_type"]
    if not math.isfinite(float(args["guidance_scale"])) or args["guidance_scale"] < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {args['guidance_scale']}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if args["num_videos_per_prompt"] < 1:
        raise ValueError(f"num_videos_per_prompt must be >= 1, got {args['num_videos_per_prompt']}")
    if args["max_sequence_length"] > TEXT_TOKENS or args["max_sequence_length"] < 1:
        raise ValueError(f"max_sequence_length must be between 1 and {TEXT_TOKENS}, got {args['max_sequence_length']}")
    tensor_inputs = tuple(args["callback_on_step_end_tensor_inputs"] or ())
    unknown = [k for k in tensor_inputs if k not in pipe._callback_tensor_inputs]
    if unknown:
        raise ValueError(f"callback tensor inputs {unknown} are not among {list(pipe._callback_tensor_inputs)}")
    req = EditRequest(
        image=image, prompts=prompts, negative_prompts=negatives, height=height, width=width,
        num_frames=num_frames, num_inference_steps=args["num_inference_steps"],
        guidance_scale=float(args["guidance_scale"]), num_videos_per_prompt=args["num_videos_per_prompt"],
        generator=args["generator"], latents=args["latents"], prompt_embeds=args["prompt_embeds"],
        negative_prompt_embeds=args["negative_prompt_embeds"], output_type=output_type,
        attention_kwargs=args["attention_kwargs"], callback=args["callback_on_step_end"],
        callback_tensor_inputs=tensor_inputs, max_sequence_length=args["max_sequence_length"],
        reasoning=plan, return_trajectory=bool(args["return_trajectory"]),
    )  # fmt: skip
    _check_tensors(req, pipe)
    return req


def _check_prompts(args: dict[str, Any]) -> tuple[list[str], list[str]]:
    prompt, embeds = args["prompt"], args["prompt_embeds"]
    if prompt is None and embeds is None:
        raise ValueError("give a prompt (or prompt_embeds)")
    if prompt is not None and embeds is not None:
        raise ValueError("give either prompt or prompt_embeds, not both")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else [""] * len(embeds)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    negative = args["negative_prompt"] or ""
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")
    return prompts, negatives


def _check_size(image: PIL.Image.Image, width: int | None, height: int | None, pipe: Any) -> tuple[int, int]:
    if (width is None) != (height is None):
        raise ValueError("give both height and width, or neither (then the 720x1280 area is used)")
    if width is None:
        return auto_size(*image.size)
    multiple = pipe.vae_spatial_factor * pipe.transformer.config.patch_size[1]
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value) or value < multiple or value % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple} and at least {multiple}, got {value}")
    return int(width), int(height)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_frames(args: dict[str, Any]) -> tuple[int, ReasoningPlan]:
    """num_frames and the reasoning plan; nothing is silently replaced."""
    steps, reasoning = args["num_inference_steps"], bool(args["enable_temporal_reasoning"])
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {steps}")
    num_frames = args["num_frames"]
    if num_frames is None:
        num_frames = REASONING_FRAMES if reasoning else PLAIN_EDIT_FRAMES
    if not _is_int(num_frames) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if not reasoning and num_frames != PLAIN_EDIT_FRAMES:
        raise ValueError(
            f"num_frames={num_frames} needs enable_temporal_reasoning=True (a plain edit is {PLAIN_EDIT_FRAMES} frames)"
        )
    if reasoning and (num_frames < MIN_REASONING_FRAMES or (num_frames - 1) % 4):
        raise ValueError(
            f"num_frames must be 4k+1 and at least {MIN_REASONING_FRAMES} with temporal reasoning "
            f"(e.g. {REASONING_FRAMES}), got {num_frames}"
        )
    reasoning_steps = args["num_temporal_reasoning_steps"]
    reasoning_steps = steps if reasoning_steps is None else reasoning_steps
    if reasoning and (not _is_int(reasoning_steps) or not 0 <= reasoning_steps <= steps):
        raise ValueError(f"num_temporal_reasoning_steps must be between 0 and {steps}, got {reasoning_steps}")
    plan = ReasoningPlan(num_inference_steps=steps, reasoning_steps=reasoning_steps, enabled=reasoning)
    if args["return_trajectory"] and (not reasoning or reasoning_steps == 0):
        raise ValueError("return_trajectory needs enable_temporal_reasoning=True and at least 1 reasoning step")
    return num_frames, plan


def _check_tensors(req: EditRequest, pipe: Any) -> None:
    """Shapes of user-given latents and embeddings."""
    batch = len(req.prompts)
    text_dim = pipe.transformer.config.text_dim
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        value = getattr(req, name)
        if value is not None and (value.ndim != 3 or tuple(value.shape) != (batch, TEXT_TOKENS, text_dim)):
            raise ValueError(f"{name} must be [{batch}, {TEXT_TOKENS}, {text_dim}], got {tuple(value.shape)}")
    if isinstance(req.generator, list) and len(req.generator) != batch * req.num_videos_per_prompt:
        raise ValueError(f"got {len(req.generator)} generators for {batch * req.num_videos_per_prompt} videos")
    if req.latents is not None:
        factor = pipe.vae_spatial_factor
        shape = (batch * req.num_videos_per_prompt, pipe.vae.config.z_dim, latent_frames(req.num_frames),
                 req.height // factor, req.width // factor)  # fmt: skip
        if tuple(req.latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(req.latents.shape)}")
