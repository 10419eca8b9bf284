"""The flow-matching objective ChronoEdit (Wan) was trained with, written as the pipeline runs the model.

``x_t = (1 - σ)·x0 + σ·ε``; the model, given ``cat([x_t, mask, condition])`` at timestep ``1000·σ``, predicts the
velocity ``ε - x0`` (the UniPC scheduler's flow_prediction). σ is drawn uniform (or logit-normal) and shifted like
the sampler's sigmas, ``σ' = s·σ / (1 + (s - 1)·σ)`` with the same shift (5 by default), so training sees the noise
levels inference visits. The mask and condition are the pipeline's (:func:`chronoedit.latents.first_frame_mask`);
the latent frame count decides the RoPE positions exactly as at inference (2 frames: 0 and 7; a video: 0..F-1).
"""

from __future__ import annotations

import torch

from ..latents import first_frame_mask

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = shift·σ / (1 + (shift - 1)·σ), the flow shift of the scheduler."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(
    batch: int, generator: torch.Generator, shift: float, sampling: str = "uniform", mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """[batch] shifted noise levels in (0, 1), float32, drawn from ``generator`` (CPU)."""
    if sampling == "logit_normal":
        sigma = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    else:
        sigma = torch.rand(batch, generator=generator)
    return shift_sigmas(sigma.clamp(1e-4, 1 - 1e-4), shift)


def flow_matching_loss(
    transformer: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    loss_on_first_frame: bool = True,
) -> torch.Tensor:
    """Mean squared error of the predicted velocity. batch: latents / condition / noise [B, 16, F, h, w] (fp32),
    sigma [B], prompt_embeds [B, 512, text_dim], image_embeds [B, 257, image_dim] -> a scalar (fp32)."""
    x0, noise, condition = batch["latents"], batch["noise"], batch["condition"]
    sigma = batch["sigma"].to(x0.device, torch.float32)
    s = sigma.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise  # [B, 16, F, h, w]
    mask = first_frame_mask(x0.shape[0], x0.shape[2], *x0.shape[-2:], device=x0.device)  # [B, 4, F, h, w]
    dtype = _input_dtype(transformer)
    model_input = torch.cat([noisy, mask, condition], dim=1).to(dtype)  # [B, 36, F, h, w]
    pred = transformer(
        model_input,
        sigma * NUM_TRAIN_TIMESTEPS,
        batch["prompt_embeds"].to(dtype),
        batch["image_embeds"].to(dtype),
        return_dict=False,
    )[0]
    error = (pred.float() - (noise - x0)) ** 2  # [B, 16, F, h, w]
    if not loss_on_first_frame:
        error = error[:, :, 1:]
    return error.mean()


def _input_dtype(transformer: torch.nn.Module) -> torch.dtype:
    """The dtype of the patch embedding (through DDP/peft wrappers); under autocast fp32 inputs are fine too."""
    module = getattr(transformer, "module", transformer)
    return module.patch_embedding.weight.dtype
