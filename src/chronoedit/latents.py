"""Latent-space bookkeeping around the Wan VAE: noise, the first-frame condition and mask, decode, postprocess."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

MASK_CHANNELS = 4


def latent_frames(num_frames: int, temporal_factor: int = 4) -> int:
    """Pixel frames -> latent frames of the causal Wan VAE: 5 -> 2, 29 -> 8."""
    return (num_frames - 1) // temporal_factor + 1


def latent_stats(vae: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std), each [1, z_dim, 1, 1, 1] float32: the normalisation the transformer was trained with."""
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
    return mean.to(device), inv_std.to(device)


def image_to_tensor(image: PIL.Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] float32 in [-1, 1], resized with Lanczos when its size differs."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=PIL.Image.LANCZOS)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def encode_condition(vae: torch.nn.Module, image: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The input image followed by black frames, VAE posterior mean, normalised.

    image: [1, 3, H, W] in [-1, 1] -> [1, z_dim, F_lat, H/8, W/8] float32.
    """
    video = torch.cat([image.unsqueeze(2), image.new_zeros(*image.shape[:2], num_frames - 1, *image.shape[2:])], 2)
    return encode_video(vae, video)


def encode_video(vae: torch.nn.Module, video: torch.Tensor) -> torch.Tensor:
    """VAE posterior mean of a video, normalised as the transformer sees latents.

    video: [B, 3, F, H, W] in [-1, 1] -> [B, z_dim, (F - 1) // 4 + 1, H/8, W/8] float32.
    """
    param = next(vae.parameters())
    latent = vae.encode(video.to(param.device, param.dtype)).latent_dist.mode().float()
    mean, inv_std = latent_stats(vae, latent.device)
    return (latent - mean) * inv_std


def first_frame_mask(batch: int, frames: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """[B, 4, F_lat, h, w]: ones on latent frame 0 (the given input), zeros where the model must generate."""
    mask = torch.zeros(batch, MASK_CHANNELS, frames, height, width, device=device)
    mask[:, :, 0] = 1.0
    return mask


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """[B, z_dim, F_lat, h, w] normalised latents -> [B, 3, F, H, W] video in [-1, 1]."""
    param = next(vae.parameters())
    mean, inv_std = latent_stats(vae, param.device)
    latents = latents.to(param.device, param.dtype)
    latents = latents / inv_std.to(param.dtype) + mean.to(param.dtype)
    return vae.decode(latents, return_dict=False)[0]


def postprocess(video: torch.Tensor, output_type: str) -> torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]:
    """[B, 3, F, H, W] in [-1, 1] -> np (B, F, H, W, 3) | pt (B, F, 3, H, W) | pil [[Image] * F] * B, in [0, 1]."""
    frames = (video.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]
    if output_type == "pt":
        return frames
    array = frames.permute(0, 1, 3, 4, 2).cpu().numpy()  # [B, F, H, W, 3]
    if output_type == "np":
        return array
    return [[PIL.Image.fromarray((f * 255).round().astype("uint8")) for f in clip] for clip in array]
