"""Judge-free metrics of one edit: CLIP image similarity between input and output (with the checkpoint's own CLIP
image encoder: identity preservation), PSNR and SSIM against a reference image, and the fraction of pixels changed.

The input is resized to the output's size the way the editor resized it (bicubic) before comparing; the output is
resized to the reference's size. PSNR and SSIM come from ``torchmetrics`` when installed (the ``eval`` extra), else
from the same formulas here (Gaussian window 11, sigma 1.5, data range 1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..sizing import resize_for_edit

CHANGE_THRESHOLD = 0.05  # a pixel changed when a channel moved by more than this (in [0, 1], about 13 of 255)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [1, 3, H, W] float64 in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def changed_fraction(source: Image.Image, edited: Image.Image, threshold: float = CHANGE_THRESHOLD) -> float:
    """The fraction of the edited image's pixels whose largest channel difference from the (resized) input exceeds
    ``threshold``."""
    source = resize_for_edit(source, *edited.size)
    diff = (to_tensor(source) - to_tensor(edited)).abs().amax(dim=1)  # [1, H, W]
    return float((diff > threshold).double().mean())


def psnr(edited: Image.Image, reference: Image.Image) -> float:
    """PSNR (dB) of the edited image, resized to the reference's size, against the reference; inf when identical."""
    preds, target = to_tensor(resize_for_edit(edited, *reference.size)), to_tensor(reference)
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio
    except ImportError:
        mse = float(((preds - target) ** 2).mean())
        return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    return float(peak_signal_noise_ratio(preds, target, data_range=1.0))


def ssim(edited: Image.Image, reference: Image.Image) -> float:
    """SSIM of the edited image, resized to the reference's size, against the reference (11x11 Gaussian, sigma 1.5)."""
    preds, target = to_tensor(resize_for_edit(edited, *reference.size)), to_tensor(reference)
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure
    except ImportError:
        return ssim_reference(preds, target)
    return float(structural_similarity_index_measure(preds, target, data_range=1.0))


def ssim_reference(preds: torch.Tensor, target: torch.Tensor, kernel: int = 11, sigma: float = 1.5) -> float:
    """SSIM as torchmetrics (1.x) computes it (Gaussian window, reflect padding, variances clamped at 0, the mean over
    every pixel); inputs [1, C, H, W] in [0, 1]."""
    channels = preds.shape[1]
    coords = torch.arange(kernel, dtype=preds.dtype) - (kernel - 1) / 2
    gauss = torch.exp(-(coords**2) / (2 * sigma**2))
    gauss = gauss / gauss.sum()
    window = (gauss[:, None] * gauss[None, :]).expand(channels, 1, kernel, kernel)  # [C, 1, k, k]
    pad = (kernel - 1) // 2
    stack = torch.cat([preds, target, preds * preds, target * target, preds * target])  # [5, C, H, W]
    stack = torch.nn.functional.pad(stack, (pad, pad, pad, pad), mode="reflect")
    mu_p, mu_t, e_pp, e_tt, e_pt = torch.nn.functional.conv2d(stack, window, groups=channels)  # each [C, H, W]
    var_p, var_t, cov = (e_pp - mu_p**2).clamp(min=0), (e_tt - mu_t**2).clamp(min=0), e_pt - mu_p * mu_t
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return float(index.mean())


class ClipSimilarity:
    """Cosine similarity of two images' CLIP embeddings (the pooled, post-layernorm class token) from a CLIP vision
    model and its image processor: the checkpoint's own ``image_encoder`` and ``image_processor``."""

    def __init__(self, encoder: Any, processor: Any, name: str = "") -> None:
        self.encoder, self.processor, self.name = encoder, processor, name

    @classmethod
    def from_checkpoint(cls, folder: Path, device: str = "cpu") -> ClipSimilarity:
        """Load ``image_encoder/`` and ``image_processor/`` of a diffusers-layout checkpoint folder (float32)."""
        from transformers import CLIPImageProcessor, CLIPVisionModel

        encoder = CLIPVisionModel.from_pretrained(folder / "image_encoder", torch_dtype=torch.float32).to(device)
        processor = CLIPImageProcessor.from_pretrained(folder / "image_processor")
        return cls(encoder.eval(), processor, str(folder / "image_encoder"))

    def embed(self, image: Image.Image) -> torch.Tensor:
        """image -> [hidden] unit vector."""
        param = next(self.encoder.parameters())
        pixels = self.processor(images=[image.convert("RGB")], return_tensors="pt").pixel_values  # [1, 3, 224, 224]
        with torch.inference_mode():
            pooled = self.encoder(pixel_values=pixels.to(param.device, param.dtype)).pooler_output  # [1, hidden]
        return torch.nn.functional.normalize(pooled.float()[0], dim=0)

    def __call__(self, first: Image.Image, second: Image.Image) -> float:
        return float(torch.dot(self.embed(first), self.embed(second)))
