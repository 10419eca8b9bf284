"""The flow-matching objective ChronoEdit (Wan) was trained with, written as the pipeline runs the model.

``x_t = (1 - σ)·x0 + σ·ε``; the model, given ``cat([x_t, mask, condition])`` at timestep ``1000·σ``, predicts the
velocity ``ε - x0`` (the UniPC scheduler's flow_prediction). σ is shifted like the sampler's sigmas,
``σ' = s·σ / (1 + (s - 1)·σ)`` with the same shift (5 by default), so training sees the noise levels inference visits.

The two recipes NVIDIA used:

- LoRA (DiffSynth, ``FlowMatchScheduler.set_timesteps(1000, training=True)``; ``WanVideoPipeline.training_loss``):
  ``uniform_steps`` picks one of the 1000 shifted training timesteps ``σ' = shift(1 - k/1000)``, k = 0..999, uniformly;
  ``bell`` weights the loss by ``exp(-2((t - 500)/1000)²)`` at ``t = 1000σ'``, shifted so its minimum over those
  timesteps (at σ = 1) is 0 and scaled to mean 1 over them.
- Full training of the base model (``RectifiedFlow``, ``train_time_distribution="logitnormal"``,
  ``train_time_weight="uniform"``): ``logit_normal`` σ, then shifted; uniform weight.

The mask and condition are the pipeline's (:func:`chronoedit.latents.first_frame_mask`); the latent frame count
decides the RoPE positions exactly as at inference (2 frames: 0 and 7; a video: 0..F-1).
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
    """[batch] shifted noise levels in (0, 1] float32, drawn from ``generator`` (CPU): ``uniform_steps`` one of the
    1000 shifted training timesteps (σ = 1 included, as DiffSynth), else a continuous σ in (0, 1)."""
    if sampling == "uniform_steps":
        step = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
        return shift_sigmas(1 - step.float() / NUM_TRAIN_TIMESTEPS, shift)
    if sampling == "logit_normal":
        sigma = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    else:
        sigma = torch.rand(batch, generator=generator)
    return shift_sigmas(sigma.clamp(1e-4, 1 - 1e-4), shift)


def training_timesteps(shift: float) -> torch.Tensor:
    """[1000] DiffSynth's shifted training timesteps, from t = 1000 (σ = 1) down (float64)."""
    sigma = 1 - torch.arange(NUM_TRAIN_TIMESTEPS, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    return shift_sigmas(sigma, shift) * NUM_TRAIN_TIMESTEPS


def loss_weights(sigma: torch.Tensor, shift: float, weighting: str) -> torch.Tensor:
    """[B] float32 loss weights of the shifted noise levels ``sigma`` [B]: ones (``uniform``), or DiffSynth's
    ``bell`` curve, 0 at σ = 1 and mean 1 over the training timesteps (continuous σ take the curve's value)."""
    if weighting == "uniform":
        return torch.ones_like(sigma, dtype=torch.float32)

    def bell(t: torch.Tensor) -> torch.Tensor:
        half = NUM_TRAIN_TIMESTEPS / 2
        return torch.exp(-2 * ((t - half) / NUM_TRAIN_TIMESTEPS) ** 2)

    grid = bell(training_timesteps(shift))
    floor, total = grid.min(), (grid - grid.min()).sum()
    weight = (bell(sigma.double() * NUM_TRAIN_TIMESTEPS) - floor).clamp(min=0) * (NUM_TRAIN_TIMESTEPS / total)
    return weight.float()


def flow_matching_loss(
    transformer: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    loss_on_first_frame: bool = True,
    weighting: str = "uniform",
    shift: float = 5.0,
) -> torch.Tensor:
    """Mean squared error of the predicted velocity, each sample's weighted by :func:`loss_weights` of its σ.
    batch: latents / condition / noise [B, 16, F, h, w] (fp32), sigma [B], prompt_embeds [B, 512, text_dim],
    image_embeds [B, 257, image_dim] -> a scalar (fp32)."""
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
    if weighting == "uniform":
        return error.mean()
    per_sample = error.flatten(1).mean(dim=1)  # [B]
    return (loss_weights(sigma, shift, weighting).to(per_sample.device) * per_sample).mean()


def _input_dtype(transformer: torch.nn.Module) -> torch.dtype:
    """The dtype of the patch embedding (through DDP/peft wrappers); under autocast fp32 inputs are fine too."""
    module = getattr(transformer, "module", transformer)
    return module.patch_embedding.weight.dtype
