"""Temporal reasoning: denoise the in-between "reasoning" frames for the first steps, then drop them.

A reasoning edit generates a short video (29 pixel frames = 8 latent frames) from the input to the edit. After
``num_temporal_reasoning_steps`` steps the middle latent frames are discarded: from the latents, from the condition
(mask and image latents) and from the solver's history, all at once, so the rest runs as a cheap 2-frame edit.
The model's clean-image prediction of every frame at the last reasoning step is kept as the editing trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FRAME_DIM = 2  # latents are [B, C, F, H, W]
EDIT_FRAMES = [0, -1]  # the input and the edit


@dataclass(frozen=True)
class ReasoningPlan:
    """When the reasoning frames go. ``drop_step`` is None when they are kept to the end (or there are none)."""

    num_inference_steps: int
    reasoning_steps: int
    enabled: bool

    @property
    def drop_step(self) -> int | None:
        """The step at whose start the frames are dropped (0 = before the first step)."""
        if not self.enabled or self.reasoning_steps >= self.num_inference_steps:
            return None
        return self.reasoning_steps

    @property
    def capture_step(self) -> int | None:
        """The last step that still predicts all frames, whose clean prediction becomes the trajectory."""
        drop = self.drop_step
        return None if drop is None or drop == 0 else drop - 1


def keep_edit_frames(tensor: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, C, 2, H, W]: the first and last frame."""
    return tensor[:, :, EDIT_FRAMES]


def prune_solver_state(scheduler: Any, num_frames: int) -> int:
    """Cut every video-shaped tensor the scheduler holds (e.g. UniPC ``model_outputs`` and ``last_sample``,
    DPM-Solver++ ``model_outputs``) from ``num_frames`` frames to the first and last. Returns how many it cut.

    Works on any diffusers scheduler: it looks at the scheduler's state rather than at one class's attribute names.
    """
    pruned = 0

    def prune(value: Any) -> Any:
        nonlocal pruned
        if isinstance(value, torch.Tensor) and value.ndim == 5 and value.shape[FRAME_DIM] == num_frames:
            pruned += 1
            return keep_edit_frames(value)
        if isinstance(value, list):
            return [prune(v) for v in value]
        if isinstance(value, tuple):
            return tuple(prune(v) for v in value)
        return value

    for name, value in list(vars(scheduler).items()):
        if name != "config":
            setattr(scheduler, name, prune(value))
    return pruned


def drop_reasoning_frames(
    latents: torch.Tensor, condition: torch.Tensor, scheduler: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the reasoning frames from the latents [B, 16, F, h, w], the condition [B, 20, F, h, w] and the
    solver history together; returns the 2-frame latents and condition."""
    prune_solver_state(scheduler, latents.shape[FRAME_DIM])
    return keep_edit_frames(latents), keep_edit_frames(condition)


def clean_prediction(sample: torch.Tensor, flow: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """x0 from a flow-matching velocity: x_t = (1 - s) x0 + s noise and v = noise - x0, so x0 = x_t - s v."""
    return sample - sigma * flow.to(sample.dtype)


def join_trajectory(reasoning_video: torch.Tensor, edit_video: torch.Tensor) -> torch.Tensor:
    """Reasoning frames (decoded from all latents but the last) then the edit video's frames after its first.

    [B, 3, 25, H, W] + [B, 3, 5, H, W] -> [B, 3, 29, H, W]: starts at the input, ends exactly at the edit.
    """
    return torch.cat([reasoning_video, edit_video[:, :, 1:]], dim=FRAME_DIM)
