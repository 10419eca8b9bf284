"""LoRAs attached to our transformer with peft: matching a :class:`~chronoedit.lora.formats.LoraFile` against the
model, injecting peft layers, and the adapter state (several adapters, each with its scale; disable, enable, fuse,
unfuse, unload).

A module's delta at scale ``s`` is ``s·(alpha/r)·up@down`` (no alpha: alpha = r) plus ``s·diff_b`` and ``s·diff``.
Low-rank pairs become peft LoRA layers (one peft adapter per file, per-adapter scales). ``diff``/``diff_b`` (exact
deltas of a bias, a weight or a bare parameter such as ``scale_shift_table``) belong to the adapter in the same way:
:mod:`.deltas` adds ``Σ scale·delta`` of the active adapters at forward time, so the base parameters keep their
original values until :func:`fuse_lora` (as diffusers does for ``diff_b``, which it loads as peft ``lora_B`` biases
with the adapter's scale). Fusing writes both into the weights; unfusing restores the touched parameters exactly.
Any change of the active set, scales, on/off or of the loaded adapters unfuses first. Scales are checked against
:data:`MAX_SCALE` (:func:`check_scale`, the one rule every front end applies too).
"""

from __future__ import annotations

import math
import numbers
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UserError
from . import deltas as _deltas
from .formats import LoraFile, LoraModule, as_lora_file, lora_config

_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_STATE_ATTR = "_chronoedit_lora"
# The largest |scale| a LoRA is applied at. LoRAs are made for scales near 1 and pushed for effect to a few times that
# (or negated); at 100 the delta dwarfs the weights and only noise comes out, and far beyond it (1e308) the first
# matmul overflows to Inf and the run dies with NaN latents many minutes later. The one bound for every way a scale
# comes in: the front ends through chronoedit.editing.resolve (before anything loads), the Python API here.
MAX_SCALE = 100.0


def check_scale(scale: Any, what: str, field: str | None = None) -> float:
    """``scale`` as a float when it is a finite real number within +-:data:`MAX_SCALE`; else a UserError naming
    ``what`` (e.g. ``LoRA style.safetensors``) and, for the front ends, the settings ``field``."""
    ok = isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale)
    if not ok or abs(scale) > MAX_SCALE:
        raise UserError(f"the scale of {what} must be a finite number within +-{MAX_SCALE:g}, got {scale!r}", field)
    return float(scale)


# ---------------------------------------------------------------------------------------------- matching the model
def match_model(
    transformer: nn.Module, lora: LoraFile, strict: bool = True
) -> tuple[dict[str, LoraModule], dict[str, torch.Tensor]]:
    """Check ``lora`` against the model: shapes (UserError naming key and both shapes) and names (unknown ones:
    UserError, or a warning with ``strict=False``). Returns the low-rank modules and the diff/diff_b deltas keyed
    by our parameter name."""
    unknown = list(lora.unknown)
    low_rank: dict[str, LoraModule] = {}
    deltas: dict[str, torch.Tensor] = {}
    for name, module in lora.modules.items():
        targets = _targets(transformer, name, module)
        if targets is None:
            unknown.extend(module.keys.values())
            continue
        for part, (param_name, param) in targets.items():
            _check_shape(lora.label, name, part, module, param)
            if part != "lora":
                _check_delta_target(transformer, lora.label, param_name, part, module)
                deltas[param_name] = getattr(module, part)
        if module.has_lora:
            low_rank[name] = module
    if unknown:
        text = f"LoRA {lora.label}: {len(unknown)} key(s) match no layer of the model, e.g. {unknown[:4]}"
        if strict:
            raise UserError(text + " (strict=False, or --lora-allow-unmatched on the command line, skips them)")
        warnings.warn(text + "; skipped", stacklevel=3)
    if not low_rank and not deltas:
        raise UserError(f"LoRA {lora.label}: none of its keys match the model")
    return low_rank, deltas


def _targets(transformer: nn.Module, name: str, module: LoraModule) -> dict[str, tuple[str, torch.Tensor]] | None:
    """part ("lora", "diff", "diff_b") -> (our parameter name, the parameter); None when the model has no such
    module or the module cannot take the part (LoRA needs a Linear/Conv3d, diff_b a bias)."""
    owner = _find(transformer, name)
    if isinstance(owner, torch.Tensor):  # a bare parameter (scale_shift_table): only a full diff applies
        ok = module.diff is not None and not module.has_lora and module.diff_b is None
        return {"diff": (name, owner)} if ok else None
    if owner is None:
        return None
    base = _base_layer(owner)
    weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
    targets: dict[str, tuple[str, torch.Tensor]] = {}
    if module.has_lora:
        if not isinstance(base, nn.Linear | nn.Conv3d):
            return None
        targets["lora"] = (f"{name}.weight", weight)
    for part, leaf, param in (("diff", "weight", weight), ("diff_b", "bias", bias)):
        if getattr(module, part) is not None:
            if not isinstance(param, torch.Tensor):
                return None
            targets[part] = (f"{name}.{leaf}", param)
    return targets


def _find(transformer: nn.Module, name: str) -> nn.Module | torch.Tensor | None:
    """The submodule or parameter called ``name``, or None."""
    try:
        return transformer.get_submodule(name)
    except AttributeError:
        pass
    try:
        return transformer.get_parameter(name)
    except AttributeError:
        return None


def _check_shape(label: str, name: str, part: str, module: LoraModule, param: torch.Tensor) -> None:
    """UserError naming the file key, the module and both shapes when a tensor does not fit the model."""
    shape = list(param.shape)
    if part != "lora":
        tensor, what = getattr(module, part), "bias" if part == "diff_b" else "weight"
        if list(tensor.shape) != shape:
            key = module.keys.get(part) or module.keys.get("up_bias") or f"{name}.{part}"
            raise UserError(
                f"LoRA {label}: {name} {part} is {list(tensor.shape)} but the model's {what} is {shape} (key {key!r})"
            )
        return
    down, up, rank = module.down, module.up, module.rank
    if up.shape[1] != rank:
        raise UserError(
            f"LoRA {label}: {name} lora_A is {list(down.shape)} but lora_B is {list(up.shape)} "
            f"(ranks {rank} and {up.shape[1]} differ; key {module.keys.get('up', name)!r})"
        )
    expected = {"down": [rank, *shape[1:]], "up": [shape[0], rank, *[1] * (len(shape) - 2)]}
    for part_name, tensor, label_ab in (("down", down, "lora_A"), ("up", up, "lora_B")):
        if list(tensor.shape) != expected[part_name]:
            raise UserError(
                f"LoRA {label}: {name} {label_ab} is {list(tensor.shape)} but the model's weight is "
                f"{shape} (key {module.keys.get(part_name, name)!r})"
            )


def _check_delta_target(
    transformer: nn.Module, label: str, param_name: str, part: str, module: LoraModule
) -> None:
    """UserError when the parameter a diff/diff_b adds to is not a plain parameter (a quantized layer's weight
    is dequantized from read-only bytes at every call: a full weight delta cannot apply there)."""
    holder, leaf = _holder(transformer, param_name)
    if not isinstance(holder._parameters.get(leaf), nn.Parameter):
        key = module.keys.get(part) or module.keys.get("up_bias") or param_name
        raise UserError(
            f"LoRA {label}: {param_name} is read-only (a quantized layer's weight), {part} key {key!r} cannot "
            "apply there; load the LoRA on a model that is not quantized"
        )


# ------------------------------------------------------------------------------------------ adapters on the model
@dataclass
class _Adapter:
    scale: float
    deltas: dict[str, torch.Tensor]  # our parameter name -> diff / diff_b at scale 1


@dataclass
class _LoraState:
    """Kept on the transformer: the adapters, which are active, the hooks that add diff/diff_b deltas at forward
    time (by the owning module's name) and, while fused, the original values of the parameters deltas were
    fused into."""

    adapters: dict[str, _Adapter] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    enabled: bool = True
    fused: list[str] = field(default_factory=list)
    hooks: dict[str, tuple[RemovableHandle, RemovableHandle]] = field(default_factory=dict)
    fused_originals: dict[str, torch.Tensor] = field(default_factory=dict)


def load_lora(
    transformer: nn.Module,
    path_or_state: str | os.PathLike[str] | LoraFile | Mapping[str, torch.Tensor],
    adapter_name: str | None = None,
    scale: float = 1.0,
    strict: bool = True,
) -> str:
    """Attach a LoRA as a new adapter, active at ``scale`` together with those already active; returns its name
    (default: the file stem, made unique)."""
    scale = check_scale(scale, f"LoRA {_describe(path_or_state)}")
    lora = as_lora_file(path_or_state)
    state = _state(transformer) or _LoraState()
    name = _new_adapter_name(state, adapter_name, lora)
    low_rank, deltas = match_model(transformer, lora, strict)
    setattr(transformer, _STATE_ATTR, state)
    _unfuse(transformer, state)
    if low_rank:
        _inject(transformer, name, low_rank)
    for param_name in deltas:
        _hook_owner(transformer, state, param_name)
    state.adapters[name] = _Adapter(scale=scale, deltas=deltas)
    state.active.append(name)
    _sync(transformer, state)
    return name


def set_adapters(transformer: nn.Module, names: str | list[str], scales: float | list[float] | None = None) -> None:
    """Make exactly ``names`` active, each at its scale (default: the scale it has)."""
    state = _require_state(transformer)
    names = [names] if isinstance(names, str) else list(names)
    _check_names(state, names)
    if scales is None:
        scales = [state.adapters[n].scale for n in names]
    elif isinstance(scales, numbers.Real):
        scales = [scales] * len(names)
    elif not isinstance(scales, list | tuple):
        raise UserError(f"set_adapters: give one scale or a list of scales, got {type(scales).__name__}")
    if len(scales) != len(names):
        raise UserError(f"set_adapters: {len(names)} adapter name(s) but {len(scales)} scale(s)")
    checked = [check_scale(value, f"adapter {name!r}") for name, value in zip(names, scales, strict=True)]
    _unfuse(transformer, state)
    for name, value in zip(names, checked, strict=True):
        state.adapters[name].scale = value
    state.active = names
    _sync(transformer, state)


def disable_lora(transformer: nn.Module) -> None:
    """Run the base model (adapters stay loaded; :func:`enable_lora` brings them back)."""
    state = _require_state(transformer)
    _unfuse(transformer, state)
    state.enabled = False
    _sync(transformer, state)


def enable_lora(transformer: nn.Module) -> None:
    """Undo :func:`disable_lora` (nothing to do when enabled: a fused state stays fused)."""
    state = _require_state(transformer)
    if state.enabled:
        return
    state.enabled = True
    _sync(transformer, state)


def fuse_lora(transformer: nn.Module, adapter_names: str | list[str] | None = None) -> None:
    """Merge adapters (default: the active ones, at their scales) into the base weights; they become the active
    set. Any later change (set_adapters, disable, load, unload) unfuses first."""
    state = _require_state(transformer)
    quantized = [n for n, m in transformer.named_modules() if _is_lora_layer(m) and _is_quantized(_base_layer(m))]
    if quantized:  # refuse before merging anything, so no layer is left half-fused
        raise UserError(f"cannot fuse a LoRA into quantized weights ({quantized[0]}, ...); use it unfused")
    state.enabled = True
    set_adapters(transformer, state.active if adapter_names is None else adapter_names)
    _fuse_deltas(transformer, state)  # before peft's merge: unfusing undoes peft's first, then restores exactly
    for layer in _lora_layers(transformer):
        layer.merge(adapter_names=[n for n in state.active if n in layer.lora_A])
    state.fused = list(state.active)


def unfuse_lora(transformer: nn.Module) -> None:
    """Take fused adapters out of the base weights again (they keep applying, unfused)."""
    state = _state(transformer)
    if state is not None:
        _unfuse(transformer, state)
        _sync(transformer, state)


def unload_lora(transformer: nn.Module) -> None:
    """Remove every adapter: LoRA layers replaced by the plain layers, delta buffers and hooks removed (the base
    parameters were never changed, or were restored exactly by the unfuse)."""
    state = _state(transformer)
    if state is None:
        return
    _unfuse(transformer, state)
    for param_name in _delta_params(state):
        _deltas.set_delta(*_holder(transformer, param_name), None)
    for handles in state.hooks.values():
        for handle in handles:
            handle.remove()
    for name, layer in [(n, m) for n, m in transformer.named_modules() if _is_lora_layer(m)]:
        parent, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent) if parent else transformer, child, layer.get_base_layer())
    for attr in (_STATE_ATTR, "peft_config"):
        if hasattr(transformer, attr):
            delattr(transformer, attr)


def list_adapters(transformer: nn.Module) -> list[str]:
    """Every loaded adapter, in load order."""
    state = _state(transformer)
    return list(state.adapters) if state is not None else []


def active_adapters(transformer: nn.Module) -> dict[str, float]:
    """The adapters that shape the output now, with their scales ({} when none or disabled)."""
    state = _state(transformer)
    if state is None or not state.enabled:
        return {}
    return {name: state.adapters[name].scale for name in state.active}


# -------------------------------------------------------------------------------------------------- the mechanics
def _state(transformer: nn.Module) -> _LoraState | None:
    return getattr(transformer, _STATE_ATTR, None)


def _require_state(transformer: nn.Module) -> _LoraState:
    state = _state(transformer)
    if state is None or not state.adapters:
        raise UserError("no LoRA is loaded (load one with load_lora / load_lora_weights first)")
    return state


def _check_names(state: _LoraState, names: list[str]) -> None:
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        raise UserError(f"unknown adapter(s) {unknown}; loaded: {list(state.adapters)}")


def _describe(path_or_state: Any) -> str:
    """A LoRA as its messages name it, before it is read: the path as given, or what a file in memory says."""
    if isinstance(path_or_state, LoraFile):
        return path_or_state.label
    return "<state dict>" if isinstance(path_or_state, Mapping) else str(path_or_state)


def _new_adapter_name(state: _LoraState, given: str | None, lora: LoraFile) -> str:
    """``given`` (which must be new and a valid peft name) or the file stem made safe and unique."""
    if given is not None:
        if not _ADAPTER_NAME.match(given):
            raise UserError(f"adapter name {given!r}: use letters, digits, '_' and '-' only")
        if given in state.adapters:
            raise UserError(f"adapter name {given!r} is already loaded; pick another or unload first")
        return given
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", lora.source.stem) if lora.source is not None else "default"
    stem = stem or "lora"
    name, n = stem, 1
    while name in state.adapters:
        n += 1
        name = f"{stem}_{n}"
    return name


def _inject(transformer: nn.Module, adapter_name: str, modules: dict[str, LoraModule]) -> None:
    """peft LoRA layers for ``modules`` (per-module rank/alpha through rank_pattern/alpha_pattern), then the
    file's tensors copied into them."""
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(lora_config(modules), transformer, adapter_name=adapter_name)
    with torch.no_grad():
        for name, module in modules.items():
            layer = transformer.get_submodule(name)
            layer.lora_A[adapter_name].weight.copy_(module.down)
            layer.lora_B[adapter_name].weight.copy_(module.up)


def _sync(transformer: nn.Module, state: _LoraState) -> None:
    """Bring peft layers (active set, scales, on/off) and the summed diff/diff_b deltas in line with ``state``
    (unfused: call after :func:`_unfuse`)."""
    for layer in _lora_layers(transformer):
        layer.enable_adapters(state.enabled)
        layer.set_adapter(list(state.active))
        for name in layer.scaling:
            layer.set_scale(name, state.adapters[name].scale)
    live = [state.adapters[n] for n in state.active] if state.enabled else []
    with torch.no_grad():
        for param_name in _delta_params(state):
            holder, leaf = _holder(transformer, param_name)
            device = holder._parameters[leaf].device
            total: torch.Tensor | None = None  # Σ scale·delta, float32, shaped like the parameter
            for adapter in live:
                if param_name in adapter.deltas:
                    term = adapter.scale * adapter.deltas[param_name].to(device, torch.float32)
                    total = term if total is None else total + term
            _deltas.set_delta(holder, leaf, total)


def _fuse_deltas(transformer: nn.Module, state: _LoraState) -> None:
    """Write each summed delta into its parameter (originals kept for the unfuse) and drop the delta buffers."""
    with torch.no_grad():
        for param_name in _delta_params(state):
            holder, leaf = _holder(transformer, param_name)
            delta = _deltas.get_delta(holder, leaf)
            if delta is None:
                continue
            param = holder._parameters[leaf]
            state.fused_originals[param_name] = param.detach().clone()
            param.copy_(_deltas.with_delta(param, delta))
            _deltas.set_delta(holder, leaf, None)


def _unfuse(transformer: nn.Module, state: _LoraState) -> None:
    """peft layers unmerged, then the parameters deltas were fused into set back to their exact originals (the
    delta buffers come back with the next :func:`_sync`)."""
    if not state.fused:
        return
    for layer in _lora_layers(transformer):
        if layer.merged:
            layer.unmerge()
    with torch.no_grad():
        for param_name, original in state.fused_originals.items():
            holder, leaf = _holder(transformer, param_name)
            holder._parameters[leaf].copy_(original)
    state.fused_originals.clear()
    state.fused = []


def _delta_params(state: _LoraState) -> list[str]:
    """Every parameter a loaded adapter has a diff/diff_b for, in load order."""
    return list(dict.fromkeys(p for adapter in state.adapters.values() for p in adapter.deltas))


def _hook_owner(transformer: nn.Module, state: _LoraState, param_name: str) -> None:
    """The forward hooks of :mod:`.deltas` on the module that holds ``param_name`` (once per module)."""
    owner = param_name.rpartition(".")[0]
    if owner not in state.hooks:
        state.hooks[owner] = _deltas.attach(_holder(transformer, param_name)[0])


def _lora_layers(transformer: nn.Module) -> list[Any]:
    return [m for m in transformer.modules() if _is_lora_layer(m)]


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _is_quantized(module: nn.Module) -> bool:
    from ..quant import QuantizedLinear

    return isinstance(module, QuantizedLinear)


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if _is_lora_layer(module) else module


def _holder(transformer: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module whose ``_parameters`` hold our parameter ``name`` (the base layer inside a peft wrapper), and
    the parameter's leaf name."""
    owner, _, leaf = name.rpartition(".")
    return _base_layer(transformer.get_submodule(owner) if owner else transformer), leaf


# ------------------------------------------------------------------------------------ an adapter back in the file form
def adapter_modules(transformer: nn.Module, adapter_name: str | None = None) -> dict[str, LoraModule]:
    """One loaded adapter back in the internal form (default: the only adapter)."""
    state = _require_state(transformer)
    if adapter_name is None:
        if len(state.adapters) != 1:
            raise UserError(f"name the adapter to save, one of {list(state.adapters)}")
        adapter_name = next(iter(state.adapters))
    _check_names(state, [adapter_name])
    modules: dict[str, LoraModule] = {}
    for name, layer in transformer.named_modules():
        if _is_lora_layer(layer) and adapter_name in layer.lora_A:
            modules[name] = LoraModule(
                down=layer.lora_A[adapter_name].weight.detach().clone(),
                up=layer.lora_B[adapter_name].weight.detach().clone(),
                alpha=float(layer.lora_alpha[adapter_name]),
            )
    for param_name, delta in state.adapters[adapter_name].deltas.items():
        name, part = _delta_owner(param_name)
        setattr(modules.setdefault(name, LoraModule()), part, delta.clone())
    return modules


def _delta_owner(param_name: str) -> tuple[str, str]:
    """``x.bias`` -> (x, diff_b); ``x.weight`` -> (x, diff); a bare parameter (scale_shift_table) -> (it, diff)."""
    owner, _, leaf = param_name.rpartition(".")
    if leaf in ("weight", "bias"):
        return owner, "diff_b" if leaf == "bias" else "diff"
    return param_name, "diff"
