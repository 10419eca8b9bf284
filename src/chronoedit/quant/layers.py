"""Linear layers whose weight stays quantized in memory and is dequantized only while the layer runs.

:class:`QuantizedLinear` subclasses ``nn.Linear``, so peft wraps it as a Linear base layer (unmerged LoRA works).
Its ``weight`` is a property: reading it dequantizes to the compute dtype (shape/dtype/device introspection works)
and gives a read-only view: in-place changes (a LoRA fuse, ``weight.data += ...``, ``copy_``) raise a UserError
instead of silently changing a temporary. ``state_dict()`` presents the dequantized ``weight`` (and ``bias``), so
saving a quantized model writes ordinary weights.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .qtensor import QTensor

FUSE_ERROR = "cannot fuse a LoRA into quantized weights; use it unfused (or load with quantized='dequantize')"
# In-place methods that do not change values and stay allowed on the read-only view.
_HARMLESS_INPLACE = {"requires_grad_", "retain_grad", "share_memory_"}
# One slot: the last ``weight`` read, so introspection bursts (peft reads a base layer's weight ~20 times while it
# wraps it) dequantize once. Emptied by every QuantizedLinear forward, so inference keeps nothing extra.
_LAST_WEIGHT: dict[str, Any] = {}


def _is_inplace(func: Any) -> bool:
    if getattr(func, "__self__", None) is torch._C.TensorBase.data:  # the ``.data`` descriptor: only set changes
        return getattr(func, "__name__", "") == "__set__"
    name = getattr(func, "__name__", "")
    if name in ("__setitem__", "__set__"):
        return True
    return name.endswith("_") and not name.startswith("__") and name not in _HARMLESS_INPLACE


class ReadOnlyWeight(torch.Tensor):
    """The dequantized weight of a :class:`QuantizedLinear`; any in-place change raises a UserError (a LoRA fused
    or added as a full delta into quantized weights).

    Results of other operations are plain tensors; ``.data`` stays read-only (peft merges through it)."""

    layer_name: str = ""

    @classmethod
    def wrap(cls, tensor: torch.Tensor, layer_name: str) -> ReadOnlyWeight:
        view = torch.Tensor._make_subclass(cls, tensor)
        view.layer_name = layer_name
        return view

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if _is_inplace(func):
            owner = next((a.layer_name for a in args if isinstance(a, ReadOnlyWeight)), "") or "a quantized layer"
            raise UserError(f"{owner}: its weight is quantized and read-only: {FUSE_ERROR}")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if getattr(func, "__self__", None) is torch._C.TensorBase.data:  # ``weight.data`` -> still read-only
            return cls.wrap(out, args[0].layer_name)
        return out


class QuantizedLinear(nn.Linear):
    """y = x @ dequant(W)^T + b with W kept quantized: buffers ``qdata`` (uint8 bytes) and ``qscale`` (fp8 scale
    as float32 bytes, or None). The weight is dequantized to ``x.dtype`` on ``x.device`` at every call."""

    def __init__(
        self,
        qweight: QTensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
        name: str = "",
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a dense weight
        if len(qweight.shape) != 2:
            raise ValueError(f"{name or 'QuantizedLinear'}: a Linear weight is 2-D, got shape {list(qweight.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.qtype, self.weight_shape = qweight.qtype, qweight.shape
        self._compute_dtype, self.layer_name = compute_dtype, name
        self.register_buffer("qdata", qweight.data, persistent=False)
        scale = None if qweight.scale is None else qweight.scale.float().contiguous()
        self.scale_shape = None if scale is None else tuple(scale.shape)
        self.register_buffer("qscale", None if scale is None else scale.reshape(-1).view(torch.uint8), persistent=False)
        if bias is not None and bias.is_meta:  # not loaded yet: give it the compute dtype it will be loaded in
            bias = torch.empty(bias.shape, dtype=compute_dtype, device="meta")
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.register_parameter("bias", bias)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype ``weight`` is read in: the bias's (it follows casts of the model), else the one given."""
        bias = self.bias
        return bias.dtype if bias is not None and bias.is_floating_point() else self._compute_dtype

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedLinear:
        """Device moves move the bytes; dtype casts (uint8 storage is never cast) change the compute dtype."""
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self._compute_dtype, device=self.qdata.device))
        if probe.is_floating_point():
            self._compute_dtype = probe.dtype
        return self

    def quantized_weight(self) -> QTensor:
        """The stored weight as a :class:`QTensor` (sharing this layer's buffers)."""
        scale = None if self.qscale is None else self.qscale.view(torch.float32).reshape(self.scale_shape)
        return QTensor(self.qtype, self.qdata, self.weight_shape, scale)

    def dequantized_weight(
        self, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """W: [out, in] in ``dtype`` (default: the compute dtype) on ``device`` (default: where the bytes are)."""
        return self.quantized_weight().dequantize(dtype or self.compute_dtype, device)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantized weight [out, in] in the compute dtype, read-only."""
        key = (self.compute_dtype, self.qdata.device, self.qdata.data_ptr())
        owner = _LAST_WEIGHT.get("owner")
        if owner is None or owner() is not self or _LAST_WEIGHT.get("key") != key:
            _LAST_WEIGHT.clear()
            weight = ReadOnlyWeight.wrap(self.dequantized_weight(), self.layer_name)
            owner = weakref.ref(self, lambda _: _LAST_WEIGHT.clear())  # a deleted layer leaves nothing behind
            _LAST_WEIGHT.update(owner=owner, key=key, weight=weight)
        return _LAST_WEIGHT["weight"]

    @weight.setter
    def weight(self, value: Any) -> None:
        raise ValueError(f"{self.layer_name or 'QuantizedLinear'}: cannot assign a weight to a quantized layer")

    @property
    def weight_nbytes(self) -> int:
        """Bytes the stored (quantized) weight takes."""
        return self.quantized_weight().nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        _LAST_WEIGHT.clear()
        bias = self.bias
        if bias is not None and bias.device != x.device:
            bias = bias.to(x.device)
        return F.linear(x, self.dequantized_weight(x.dtype, x.device), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"qtype={self.qtype}, compute_dtype={self.compute_dtype}"
        )

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dequantized_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


def replace_linear(
    model: nn.Module, weight_name: str, qweight: QTensor, compute_dtype: torch.dtype = torch.float32
) -> QuantizedLinear:
    """Put a :class:`QuantizedLinear` holding ``qweight`` in place of the ``nn.Linear`` whose weight is
    ``weight_name`` (``blocks.0.attn1.to_q.weight``); its bias (loaded or still on meta) moves over."""
    module_name, _, leaf = weight_name.rpartition(".")
    linear = model.get_submodule(module_name) if module_name else model
    if leaf != "weight" or not isinstance(linear, nn.Linear) or isinstance(linear, QuantizedLinear):
        raise ValueError(f"{weight_name!r} is not the weight of a plain nn.Linear: cannot quantize it")
    if qweight.shape != (linear.out_features, linear.in_features):
        raise ValueError(
            f"{weight_name!r}: quantized weight has shape {list(qweight.shape)} but the layer is "
            f"[{linear.out_features}, {linear.in_features}]"
        )
    layer = QuantizedLinear(qweight, linear.bias, compute_dtype, name=module_name)
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return layer


def quantize_model_linears(
    model: nn.Module,
    quantized: dict[str, QTensor],
    dtype: torch.dtype = torch.float32,
    keep_fp32: Callable[[str], bool] | None = None,
) -> list[str]:
    """Swap the model's ``nn.Linear`` modules (typically built on the meta device) named by the keys of ``quantized``
    (weight names ``blocks.0.attn1.to_q.weight`` or module names) for :class:`QuantizedLinear`; the compute dtype is
    ``dtype`` except float32 for the weights ``keep_fp32(weight_name)`` marks as the model's fp32 islands (for
    ChronoEdit: ``chronoedit.model.transformer.keeps_fp32``, the time embedder). Returns the module names replaced."""
    replaced = []
    for name, qweight in quantized.items():
        weight_name = name if name.endswith(".weight") else f"{name}.weight"
        compute = torch.float32 if keep_fp32 is not None and keep_fp32(weight_name) else dtype
        replaced.append(replace_linear(model, weight_name, qweight, compute).layer_name)
    return replaced


def quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every :class:`QuantizedLinear` in ``model`` (also under peft wrappers), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
