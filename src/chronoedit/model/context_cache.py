"""Cross-attention keys and values of the text and CLIP tokens, computed once per edit and branch.

The context (text tokens and CLIP image tokens) does not change across denoising steps, so neither do the keys and
values every block's cross-attention projects from it. A :class:`ContextCache` keeps them, per context passed:

- an entry is found by the *identity* of the embedding tensors passed (``is``, not equal values) and their in-place
  version counters, so a callback that replaces or edits the embeddings gets fresh keys and values;
- every entry is dropped when the weights they were projected with change: the parameters and buffers of the text
  and image embedders and of each cross-attention's K/V projections and norms (address, version, dtype, device), and
  the adapter state of LoRA layers among them (active adapters, scales, merged, disabled). Loading, switching,
  scaling, fusing or unloading a LoRA, ``load_state_dict``, ``.to()`` all change it.

Exact by construction: a hit returns tensors computed by the same operations from the same inputs and weights.
Used only without autograd (training needs gradients through the projections). Memory: per entry and block, keys
and values of (257 + 512) tokens x D (for the 14B in bf16, ~0.6 GB per branch over the 40 blocks).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# peft's LoraLayer attributes that change what a wrapped projection computes without touching a tensor.
_ADAPTER_ATTRS = ("scaling", "merged_adapters", "_active_adapter", "_disable_adapters")


@dataclass
class CrossKV:
    """Keys and values of one block's cross-attention, heads split: [B, T_text, heads, hd] and, with CLIP tokens,
    [B, T_image, heads, hd] (None without)."""

    key: torch.Tensor
    value: torch.Tensor
    image_key: torch.Tensor | None = None
    image_value: torch.Tensor | None = None


@dataclass
class ContextKV:
    """The keys and values of every block for one context, each projected the first time its block runs (inside the
    block's own forward: a streamed block's weights are on the device, in the compute dtype, only then)."""

    context: torch.Tensor  # [B, T, D], the embedded context the projections are made from
    slots: list[CrossKV | None]

    def block(self, index: int) -> LazyKV:
        return LazyKV(self, index)


@dataclass
class LazyKV:
    """One block's keys and values in a :class:`ContextKV`: projected on first use, then reused."""

    owner: ContextKV
    index: int

    def get(self, project: Any) -> CrossKV:
        """The stored keys and values, or ``project(context)`` stored now."""
        kv = self.owner.slots[self.index]
        if kv is None:
            kv = self.owner.slots[self.index] = project(self.owner.context)
        return kv


def _tensor_state(tensor: torch.Tensor | None) -> tuple[Any, ...] | None:
    """What identifies a tensor's current values without reading them."""
    if tensor is None:
        return None
    try:
        address = tensor.data_ptr()
    except RuntimeError:  # a tensor subclass without storage
        address = id(tensor)
    return address, tensor._version, tensor.dtype, tensor.device, tuple(tensor.shape)


def weights_fingerprint(modules: list[nn.Module]) -> tuple[Any, ...]:
    """A cheap token that changes whenever the values computed by ``modules`` may change (see the module doc)."""
    state: list[Any] = []
    for module in modules:
        for sub in module.modules():
            state.extend(_tensor_state(t) for t in sub._parameters.values())
            state.extend(_tensor_state(t) for t in sub._buffers.values())
            state.extend(repr(sub.__dict__[a]) for a in _ADAPTER_ATTRS if a in sub.__dict__)
    return tuple(state)


def _embedding_key(tensor: torch.Tensor | None) -> tuple[Any, ...] | None:
    """(the tensor, its version): a later lookup hits only for the very same tensor, unchanged in place."""
    if tensor is None:
        return None
    return tensor, tensor._version


class ContextCache:
    """Per-block cross-attention keys and values for up to ``max_entries`` contexts (e.g. the positive, the
    negative and the two batched together); least recently used first out. One per edit: made by the pipeline,
    dropped with it."""

    def __init__(self, max_entries: int = 4) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[int, tuple[tuple[Any, ...], tuple[Any, ...], ContextKV]] = OrderedDict()
        self._fingerprint: tuple[Any, ...] | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def check_weights(self, fingerprint: tuple[Any, ...]) -> None:
        """Drop every entry when the weights changed since the entries were made."""
        if fingerprint != self._fingerprint:
            self._entries.clear()
            self._fingerprint = fingerprint

    def lookup(self, text: torch.Tensor, image: torch.Tensor | None) -> ContextKV | None:
        """The keys and values stored for exactly these embedding tensors (unchanged since), or None."""
        try:
            text_key, image_key = _embedding_key(text), _embedding_key(image)
        except RuntimeError:  # inference-mode tensors have no version counter: never cached
            return None
        for slot, (stored_text, stored_image, kvs) in self._entries.items():
            if _same(stored_text, text_key) and _same(stored_image, image_key):
                self._entries.move_to_end(slot)
                self.hits += 1
                return kvs
        self.misses += 1
        return None

    def store(self, text: torch.Tensor, image: torch.Tensor | None, kvs: ContextKV) -> None:
        try:
            entry = (_embedding_key(text), _embedding_key(image), kvs)
        except RuntimeError:
            return
        self._entries[id(entry)] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def _same(stored: tuple[Any, ...] | None, current: tuple[Any, ...] | None) -> bool:
    if stored is None or current is None:
        return stored is current
    return stored[0] is current[0] and stored[1] == current[1]
