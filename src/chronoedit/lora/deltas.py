"""Exact deltas of LoRA files (``diff_b``: bias, ``diff``: full weight or bare parameter) applied the way peft
applies the low-rank pairs: at forward time, never written into the base parameters while unfused.

A module that owns a touched parameter gets two hooks (:func:`attach`). Its summed delta ``Σ scale·delta`` over the
active adapters is a non-persistent buffer ``lora_delta_<leaf>`` of that module (it follows ``.to()`` like peft's
``lora_A``/``lora_B`` and is not in ``state_dict()``). While the module runs, the parameter reads as
``original + delta`` (summed in float32, rounded once to the parameter's dtype); before and after, the module holds
its original :class:`~torch.nn.Parameter`. No buffer (disabled, fused, unloaded) -> the module runs as is.

One forward at a time per model (the swap is per module, as peft's adapter switching is per model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_PREFIX = "lora_delta_"
_SWAPPED = "_lora_delta_swapped"  # module.__dict__: a stack of {leaf: original Parameter} of the calls under way


def attach(module: nn.Module) -> tuple[RemovableHandle, RemovableHandle]:
    """Hook ``module`` so its parameters with a delta buffer read as original + delta during its forward; the
    handles remove the hooks. The restoring hook runs even when the forward raises."""
    pre = module.register_forward_pre_hook(_swap_in)
    post = module.register_forward_hook(_swap_out, always_call=True)
    return pre, post


def set_delta(module: nn.Module, leaf: str, delta: torch.Tensor | None) -> None:
    """Make ``delta`` (shaped like the parameter ``leaf``) the summed delta of ``module.<leaf>``; None removes it."""
    name = _PREFIX + leaf
    if delta is None:
        module._buffers.pop(name, None)
    else:
        module.register_buffer(name, delta, persistent=False)


def get_delta(module: nn.Module, leaf: str) -> torch.Tensor | None:
    """The summed delta of ``module.<leaf>``, or None."""
    return module._buffers.get(_PREFIX + leaf)


def with_delta(param: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """original + delta, summed in float32 on the parameter's device and rounded once to its dtype."""
    return (param.float() + delta.to(param.device, torch.float32)).to(param.dtype)


def _swap_in(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook: each parameter with a delta is replaced by original + delta for this call."""
    swapped: dict[str, nn.Parameter] = {}
    module.__dict__.setdefault(_SWAPPED, []).append(swapped)  # recorded first: an error below loses nothing
    for name, delta in list(module._buffers.items()):
        if not name.startswith(_PREFIX) or delta is None:
            continue
        leaf = name[len(_PREFIX) :]
        param = module._parameters.get(leaf)
        if isinstance(param, nn.Parameter):  # not already swapped by an enclosing call of the same module
            value = with_delta(param, delta)
            swapped[leaf] = param
            module._parameters[leaf] = value  # type: ignore[assignment]


def _swap_out(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """Forward hook (also after an exception): the original parameters are put back."""
    stack = module.__dict__.get(_SWAPPED)
    if stack:
        module._parameters.update(stack.pop())
    if not stack:
        module.__dict__.pop(_SWAPPED, None)
