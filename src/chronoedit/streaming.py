"""Block streaming: a model's blocks stay where and as they are stored, and only the running group is on the compute
device, in the compute dtype.

A model's repeated blocks (the transformer's 40 ``blocks``, UMT5's 24 ``encoder.block``) are split into groups of
``k``. Just before a group runs, each of its tensors is copied to the compute device and cast to the compute dtype
(float32 islands stay float32); the module's parameters point at those copies while the group runs and at the stored
tensors again afterwards, so the copies are freed. The stored tensors are never replaced: host memory holds the
checkpoint's own bytes (memory-mapped file pages when loaded that way, pinned pages on CUDA), never a second copy.
On CUDA the next group's copy starts on a side stream while the current one computes.

Everything outside the blocks (embeddings, norms, heads: a few percent of the weights) is moved and cast once, at
:func:`stream_blocks`. A token embedding (UMT5's 1 B-parameter ``shared``) stays stored: its rows are looked up in the
stored dtype and only the looked-up rows are cast.

Why not diffusers' group offloading with layerwise casting: its casting hooks cast a module's parameters in place and
back, which replaces the stored tensors with new ones (a memory-mapped checkpoint becomes anonymous memory after the
first step) and it has no separate storage dtype for its offloaded groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

StreamKey = "_chronoedit_streaming"  # attribute marking a streamed model (memory.resident leaves it where it is)


Swap = tuple[nn.Module, str, torch.Tensor, torch.Tensor]  # (owner, attribute, stored tensor, compute copy)


@dataclass
class Streaming:
    """The hooks of one streamed model: what runs where, and how to remove them."""

    device: torch.device
    compute_dtype: torch.dtype
    group_size: int
    groups: list[list[nn.Module]]
    keep_fp32: Callable[[str], bool]
    handles: list[Any] = field(default_factory=list)
    active: dict[int, list[Swap]] = field(default_factory=dict)  # groups on the device now
    prefetched: dict[int, tuple[Any, list[Swap]]] = field(default_factory=dict)
    side_stream: Any = None
    on_load: Callable[[int], None] | None = None  # called with a group's index when it is on the device (tests)

    def release(self) -> None:
        """Point every parameter back at its stored tensor (after a group that raised, its forward hook never ran)."""
        for index in list(self.active):
            for owner, name, stored, _copy in self.active.pop(index):
                _point(owner, name, stored)
        self.prefetched.clear()

    def remove(self) -> None:
        """Take the hooks off, leaving every parameter on its stored tensor."""
        self.release()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def is_streamed(module: nn.Module | None) -> bool:
    """Whether ``module`` has streamed blocks (it must not be moved as a whole)."""
    return module is not None and getattr(module, StreamKey, None) is not None


def stream_blocks(
    model: nn.Module,
    blocks: nn.ModuleList,
    device: str | torch.device,
    compute_dtype: torch.dtype,
    group_size: int = 1,
    keep_fp32: Callable[[str], bool] = lambda name: False,
    use_stream: bool = True,
    lookups: Sequence[nn.Embedding] = (),
) -> Streaming:
    """Stream ``blocks`` (a ModuleList inside ``model``) group by group to ``device`` in ``compute_dtype``; the rest
    of ``model`` is moved and cast now, but for the token embeddings in ``lookups``, which stay stored and are looked
    up there (:func:`stream_embedding`). ``keep_fp32(name)`` marks parameters (by their name inside a block or inside
    ``model``) that stay float32. Returns the :class:`Streaming`, also kept on the model (:func:`unstream`)."""
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    unstream(model)
    device = torch.device(device)
    block_ids = {id(block) for block in blocks}
    shared = {id(table.weight) for table in lookups}  # tied copies (UMT5's shared and encoder.embed_tokens) too
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding) and id(m.weight) in shared]
    _place_rest(model, block_ids | {id(table) for table in tables}, device, compute_dtype, keep_fp32)
    groups = [list(blocks[i : i + group_size]) for i in range(0, len(blocks), group_size)]
    side = torch.cuda.Stream(device) if use_stream and device.type == "cuda" else None
    streaming = Streaming(device, compute_dtype, group_size, groups, keep_fp32, side_stream=side)
    for index, group in enumerate(groups):
        streaming.handles.append(group[0].register_forward_pre_hook(_loader(streaming, index)))
        streaming.handles.append(group[-1].register_forward_hook(_unloader(streaming, index)))
    for table in tables:
        streaming.handles.extend(stream_embedding(table, device, compute_dtype))
    setattr(model, StreamKey, streaming)
    return streaming


def unstream(model: nn.Module) -> None:
    """Remove the streaming hooks of ``model``, if any (its blocks stay where they are stored)."""
    streaming = getattr(model, StreamKey, None)
    if streaming is not None:
        streaming.remove()
        delattr(model, StreamKey)


def stream_embedding(embedding: nn.Embedding, device: torch.device, compute_dtype: torch.dtype) -> list[Any]:
    """Look rows up in the stored table (where it is, in its dtype) and cast only those rows to ``compute_dtype``
    on ``device``: a 256k x 4096 table is never copied or upcast whole. Returns the hook handles."""

    def to_table(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        ids = args[0]
        return (ids.to(embedding.weight.device), *args[1:])

    def to_compute(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.to(device=device, dtype=compute_dtype)

    return [embedding.register_forward_pre_hook(to_table), embedding.register_forward_hook(to_compute)]


# --------------------------------------------------------------------------------------------------------- the hooks
def _loader(streaming: Streaming, index: int) -> Callable[..., None]:
    def load(_module: nn.Module, _args: Any) -> None:
        if streaming.active:  # a forward raised inside a group before: its copies are still pointed at
            streaming.release()
        event, swaps = streaming.prefetched.pop(index, (None, None))
        if swaps is None:
            swaps = _copies(streaming, index, stream=None)
        if event is not None:
            torch.cuda.current_stream(streaming.device).wait_event(event)
        for owner, name, _stored, copy in swaps:
            _point(owner, name, copy)
        streaming.active[index] = swaps
        if streaming.on_load is not None:
            streaming.on_load(index)
        following = index + 1
        if streaming.side_stream is not None and following < len(streaming.groups):
            streaming.prefetched[following] = _prefetch(streaming, following)

    return load


def _unloader(streaming: Streaming, index: int) -> Callable[..., None]:
    def unload(_module: nn.Module, _args: Any, _output: Any) -> None:
        for owner, name, stored, _copy in streaming.active.pop(index, []):
            _point(owner, name, stored)

    return unload


def _copies(streaming: Streaming, index: int, stream: Any) -> list[Swap]:
    """(owner, attribute, stored tensor, compute copy) for every tensor of group ``index``."""
    swaps = []
    for block in streaming.groups[index]:
        for owner, name, qualified, tensor in _tensors(block):
            dtype = _compute_dtype(tensor, streaming.compute_dtype, streaming.keep_fp32(qualified))
            copy = tensor.to(device=streaming.device, dtype=dtype, non_blocking=stream is not None)
            swaps.append((owner, name, tensor, copy))
    return swaps


def _prefetch(streaming: Streaming, index: int) -> tuple[Any, list[Swap]]:
    """Start the copies of group ``index`` on the side stream (CUDA only); the event marks them done."""
    stream = streaming.side_stream
    stream.wait_stream(torch.cuda.current_stream(streaming.device))
    with torch.cuda.stream(stream):
        swaps = _copies(streaming, index, stream)
        event = torch.cuda.Event()
        event.record(stream)
    return event, swaps


def _tensors(block: nn.Module) -> Iterator[tuple[nn.Module, str, str, torch.Tensor]]:
    """(owning module, attribute, name inside the block, tensor) for each parameter and buffer of ``block``."""
    for module_name, module in block.named_modules():
        for name, tensor in _own(module):
            yield module, name, f"{module_name}.{name}" if module_name else name, tensor


def _own(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(attribute, tensor) for the module's own parameters (their data) and buffers."""
    for name, param in module._parameters.items():
        if param is not None:
            yield name, param.data
    for name, buffer in module._buffers.items():
        if buffer is not None:
            yield name, buffer


def _compute_dtype(tensor: torch.Tensor, compute: torch.dtype, fp32: bool) -> torch.dtype:
    """Floating tensors become ``compute`` (float32 for the fp32 islands); integer/byte storage (quantized weights)
    keeps its dtype."""
    if not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if fp32 else compute


def _point(owner: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make ``owner.name`` (a parameter or a buffer) hold ``tensor`` without replacing the Parameter object."""
    param = owner._parameters.get(name)
    if param is not None:
        param.data = tensor
    else:
        owner._buffers[name] = tensor


def _place_rest(model: nn.Module, skipped: set[int], device: torch.device, compute_dtype: torch.dtype,
                keep_fp32: Callable[[str], bool]) -> None:  # fmt: skip
    """Move and cast every tensor of ``model`` outside the modules in ``skipped`` (the streamed blocks, the looked-up
    embeddings) once."""
    for module_name, module in _outside(model, skipped):
        for name, tensor in _own(module):
            fp32 = keep_fp32(f"{module_name}.{name}" if module_name else name)
            _point(module, name, tensor.to(device=device, dtype=_compute_dtype(tensor, compute_dtype, fp32)))


def _outside(model: nn.Module, skipped: set[int], prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for ``model`` and its descendants, each once (a shared embedding has two names), not
    descending into the modules in ``skipped``."""
    seen = set(skipped)

    def walk(module: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
        seen.add(id(module))
        yield name, module
        for child_name, child in module.named_children():
            if id(child) not in seen:
                yield from walk(child, f"{name}.{child_name}" if name else child_name)

    yield from walk(model, prefix)


@contextmanager
def loaded_groups(streaming: Streaming) -> Iterator[list[int]]:
    """Record the index of every group as it is loaded, for the ``with`` block (tests, progress)."""
    seen: list[int] = []
    before, streaming.on_load = streaming.on_load, seen.append
    try:
        yield seen
    finally:
        streaming.on_load = before


def stream_components(
    transformer: nn.Module | None,
    text_encoder: nn.Module | None,
    device: str | torch.device,
    compute_dtype: torch.dtype,
    group_size: int = 1,
    use_stream: bool = True,
    image_encoder: nn.Module | None = None,
) -> list[Streaming]:
    """Stream a ChronoEdit pipeline's large components: the transformer's ``blocks`` (its fp32 islands kept),
    UMT5's ``encoder.block`` with its token table looked up, CLIP's ``vision_model.encoder.layers`` when given."""
    from .model.transformer import keeps_fp32

    plans = [
        (transformer, lambda m: m.blocks, keeps_fp32, lambda m: ()),
        (text_encoder, lambda m: m.encoder.block, lambda name: False, lambda m: (m.get_input_embeddings(),)),
        (image_encoder, lambda m: m.vision_model.encoder.layers, lambda name: False, lambda m: ()),
    ]
    streams = []
    for model, blocks, fp32, lookups in plans:
        if model is not None:
            streams.append(stream_blocks(model, blocks(model), device, compute_dtype, group_size, fp32, use_stream,
                                         lookups(model)))  # fmt: skip
    return streams
