"""The stream of training items: cached samples in a seeded order, each with its own seeded noise and noise level.

Item ``i`` of the stream is a pure function of (seed, i): each epoch visits the N samples in a permutation seeded by
(seed, epoch) (with batches of B > 1, regrouped into batches of one bucket each, see :meth:`StepDataset.epoch_order`),
and the item's noise, σ and caption dropout come from a generator seeded by (seed, i). A
dropped caption is the cached empty prompt's embedding (as the base model was trained: ``TextAttrEmptyStringDrop``
in NVIDIA's ``conditioner_i2v.py``); the image condition and CLIP tokens are never dropped. Resuming at step k
therefore replays exactly the items an uninterrupted run would have seen (accelerate skips the first batches), on any
number of processes (accelerate hands process r the batches r, r + world, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .cache import CacheEntry, latent_shape, load_entry
from .flow import sample_sigmas

_MIX = 1_000_003  # keeps (seed, index) seeds apart


@dataclass(frozen=True)
class Noising:
    """How an item is noised: σ's distribution (:func:`~chronoedit.train.flow.sample_sigmas`) and caption dropout."""

    shift: float
    sampling: str
    mean: float = 0.0
    std: float = 1.0
    caption_dropout: float = 0.0
    empty_prompt: torch.Tensor | None = None  # [512, D]: the cached empty prompt (needed with caption dropout)


class StepDataset(Dataset):
    """``length`` items drawn from ``entries`` (see the module docstring)."""

    def __init__(self, entries: list[CacheEntry], length: int, seed: int, noising: Noising,
                 batch_size: int = 1) -> None:  # fmt: skip
        self.entries, self.length, self.seed, self.noising = entries, length, seed, noising
        self.sigma_args = {"shift": noising.shift, "sampling": noising.sampling, "mean": noising.mean,
                           "std": noising.std}  # fmt: skip
        self.batch_size = batch_size
        self.groups = _groups(entries) if batch_size > 1 else [list(range(len(entries)))]
        self.epoch_length = batch_size * sum(-(-len(group) // batch_size) for group in self.groups)
        self._order: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        return self.length

    def sample_index(self, index: int) -> int:
        """Which sample item ``index`` is."""
        epoch, position = divmod(index, self.epoch_length)
        return self.epoch_order(epoch)[position]

    def epoch_order(self, epoch: int) -> list[int]:
        """The samples of one epoch, a pure function of (seed, epoch): a seeded permutation; with batches of more
        than one, cut into batches of one bucket (samples of one latent shape) each, a bucket's last batch filled up
        with its own first samples, and the batches of all buckets in a seeded order."""
        if self._order[0] == epoch:
            return self._order[1]
        order = torch.randperm(len(self.entries), generator=torch.Generator().manual_seed(self.seed * _MIX + epoch))
        order = order.tolist()
        size = self.batch_size
        if size > 1:
            batches = []
            for group in self.groups:
                members = set(group)
                mine = [i for i in order if i in members]
                mine += (mine * size)[: -len(mine) % size]
                batches += [mine[k : k + size] for k in range(0, len(mine), size)]
            if len(self.groups) > 1:
                shuffle = torch.Generator().manual_seed((self.seed + 2) * _MIX + epoch)
                batches = [batches[j] for j in torch.randperm(len(batches), generator=shuffle).tolist()]
            order = [i for batch in batches for i in batch]
        self._order = (epoch, order)
        return order

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tensors = load_entry(self.entries[self.sample_index(index)])  # read per item: RAM stays flat
        generator = torch.Generator().manual_seed((self.seed + 1) * _MIX + index)
        noise = torch.randn(tensors["latents"].shape, generator=generator)  # [16, F, h, w]
        sigma = sample_sigmas(1, generator, **self.sigma_args)[0]
        dropout = self.noising.caption_dropout
        if dropout > 0 and float(torch.rand(1, generator=generator)) < dropout:
            tensors["prompt_embeds"] = self.noising.empty_prompt.to(tensors["prompt_embeds"].dtype)
        return {**tensors, "noise": noise, "sigma": sigma, "index": torch.tensor(index)}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items (of one bucket: :meth:`StepDataset.epoch_order`); ValueError for mixed shapes, a bug."""
    shapes = {tuple(item["latents"].shape) for item in items}
    if len(shapes) > 1:
        raise ValueError(f"a batch mixes latents of shapes {sorted(shapes)}")
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def _groups(entries: list[CacheEntry]) -> list[list[int]]:
    """Indices of the samples of each latent shape [16, F_lat, h, w] (a bucket and frame count), shapes sorted."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, entry in enumerate(entries):
        groups.setdefault(latent_shape(entry), []).append(index)
    return [groups[shape] for shape in sorted(groups)]
