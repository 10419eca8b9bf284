"""The stream of training items: cached samples in a seeded order, each with its own seeded noise and noise level.

Item ``i`` of the stream is a pure function of (seed, i): epoch ``i // N`` visits the N samples in a permutation
seeded by (seed, epoch), and the item's noise and σ come from a generator seeded by (seed, i). Resuming at step k
therefore replays exactly the items an uninterrupted run would have seen (accelerate skips the first batches), on any
number of processes (accelerate hands process r the batches r, r + world, ...).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .cache import CacheEntry, latent_shape, load_entry
from .flow import sample_sigmas

_MIX = 1_000_003  # keeps (seed, index) seeds apart
_VAE_STRIDE = 8  # pixels per latent row and column (the Wan VAE)


class StepDataset(Dataset):
    """``length`` items drawn from ``entries`` (see the module docstring)."""

    def __init__(
        self, entries: list[CacheEntry], length: int, seed: int, shift: float, sampling: str, mean: float, std: float
    ) -> None:
        self.entries, self.length, self.seed = entries, length, seed
        self.sigma_args = {"shift": shift, "sampling": sampling, "mean": mean, "std": std}

    def __len__(self) -> int:
        return self.length

    def sample_index(self, index: int) -> int:
        """Which sample item ``index`` is."""
        count = len(self.entries)
        epoch, position = divmod(index, count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed * _MIX + epoch))
        return int(order[position])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tensors = load_entry(self.entries[self.sample_index(index)])  # read per item: RAM stays flat
        generator = torch.Generator().manual_seed((self.seed + 1) * _MIX + index)
        noise = torch.randn(tensors["latents"].shape, generator=generator)  # [16, F, h, w]
        sigma = sample_sigmas(1, generator, **self.sigma_args)[0]
        return {**tensors, "noise": noise, "sigma": sigma, "index": torch.tensor(index)}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items; samples of different sizes or frame counts cannot share a batch (ValueError)."""
    shapes = {tuple(item["latents"].shape) for item in items}
    if len(shapes) > 1:
        raise ValueError(
            f"batch_size > 1 needs samples of one size and frame count, got latents of shapes {sorted(shapes)} "
            "(set height and width, keep pairs and videos apart, or use batch_size 1 with gradient accumulation)"
        )
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def check_batch_shapes(entries: list[CacheEntry], batch_size: int) -> None:
    """Before training: with ``batch_size`` > 1 every cached sample must have one size and frame count (a batch is
    stacked), else a UserError naming two rows that differ."""
    if batch_size < 2 or not entries:
        return
    first, shape = entries[0], latent_shape(entries[0])
    for entry in entries[1:]:
        other = latent_shape(entry)
        if other != shape:
            raise UserError(
                f"batch_size {batch_size} needs samples of one size and frame count, but {first.spec.where} is "
                f"{_described(shape)} and {entry.spec.where} {_described(other)}: set --height and --width (one size "
                "for all), keep pairs and videos apart, or use --batch-size 1 with --gradient-accumulation-steps",
                "batch_size",
            )


def _described(shape: tuple[int, ...]) -> str:
    """[16, F_lat, h, w] -> 'WIDTHxHEIGHT (F_lat latent frames)' in training pixels."""
    return f"{shape[3] * _VAE_STRIDE}x{shape[2] * _VAE_STRIDE} ({shape[1]} latent frames)"
