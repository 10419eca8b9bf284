"""LoRA files of every layout in the wild, read into one form and attached to our transformer with peft.

Layouts (``detect_layout``), all converted to one form keyed by our module names (``blocks.0.attn1.to_q``):

- ``diffusers``: ``[transformer.]blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B.weight`` (+ ``.alpha`` keys or
  diffusers' ``lora_adapter_metadata``; ``lora_B.bias`` as written by diffusers for ``diff_b``);
- ``wan``: original Wan / ComfyUI names, ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` / ``lora_up`` (or
  ``lora_A`` / ``lora_B``), ``.alpha``, ``.diff_b`` (bias delta), ``.diff`` (full weight delta, e.g. of norms);
- ``diffsynth``: DiffSynth training output, ``blocks.0.self_attn.q.lora_A.default.weight``;
- ``musubi``: musubi-tuner, ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` (+ ``.alpha``).

A module's delta at scale ``s`` is ``s·(alpha/r)·up@down`` (no alpha: alpha = r) plus ``s·diff_b`` and ``s·diff``.
Low-rank pairs become peft LoRA layers (one peft adapter per file, per-adapter scales); ``diff``/``diff_b`` cannot be
peft layers, so they are written into the parameters: the original values are kept and every change of the active
set or scales recomputes ``original + Σ scale·delta`` (exact restore on disable/unload). Any such change unfuses first.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .keymap import IN_BLOCK, TOP_LEVEL, is_original_layout, original_to_ours, ours_to_original, strip_prefix
from .loading import iter_safetensors

LAYOUTS = ("diffusers", "wan", "diffsynth", "musubi")
WRITABLE_LAYOUTS = ("diffusers", "wan")
METADATA_KEY = "lora_adapter_metadata"  # diffusers/peft: LoraConfig kwargs as JSON in the safetensors header
# The leaf of a file key -> what it holds. ``up_bias`` is peft's lora_B bias (scaled by alpha/r like the weights).
LEAVES = {
    "lora_A.default.weight": "down",
    "lora_B.default.weight": "up",
    "lora_B.default.bias": "up_bias",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_B.bias": "up_bias",
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
    "diff_b": "diff_b",
    "diff": "diff",
}
_LEAF_ORDER = sorted(LEAVES, key=len, reverse=True)
_COMFY_LEAVES = ("lora_down.weight", "lora_up.weight", "diff", "diff_b")
_DIFFSYNTH_LEAVES = ("lora_A.default.weight", "lora_B.default.weight")
# Original module names that keymap's markers do not catch (ours: ffn.net.0.proj, condition_embedder.time_proj, ...).
_ORIGINAL_ONLY = re.compile(r"(^|\.)(ffn\.\d+|time_projection\.\d+|img_emb\.proj\.\d+)$")
_MUSUBI_PREFIX = "lora_unet_"
_MUSUBI_BLOCK = re.compile(r"^blocks_(\d+)_(.+)$")
_MUSUBI_IN_BLOCK = {name.replace(".", "_"): name for name in IN_BLOCK}
_MUSUBI_TOP_LEVEL = {name.replace(".", "_"): name for name in TOP_LEVEL}
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_STATE_ATTR = "_chronoedit_lora"


# ------------------------------------------------------------------------------------------------------ the form
@dataclass
class LoraModule:
    """What one LoRA file holds for one of our modules (or, for ``diff`` only, one parameter such as
    ``blocks.0.scale_shift_table``)."""

    down: torch.Tensor | None = None  # [r, in, *kernel] (lora_A / lora_down)
    up: torch.Tensor | None = None  # [out, r, *1] (lora_B / lora_up)
    alpha: float | None = None  # None: alpha = r (scale 1)
    diff_b: torch.Tensor | None = None  # [out] bias delta
    diff: torch.Tensor | None = None  # full weight delta, shaped like the weight
    keys: dict[str, str] = field(default_factory=dict)  # part -> the file's key, for messages

    @property
    def has_lora(self) -> bool:
        return self.down is not None and self.up is not None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) if self.down is not None else 0

    @property
    def alpha_value(self) -> float:
        return float(self.alpha) if self.alpha is not None else float(self.rank)


@dataclass
class LoraFile:
    """A LoRA converted to our names. ``unknown``: file keys whose names map to no module of ours."""

    layout: str
    modules: dict[str, LoraModule]
    source: Path | None = None  # None for a state dict given in memory
    unknown: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return str(self.source) if self.source is not None else "<state dict>"


# --------------------------------------------------------------------------------------------------------- reading
def detect_layout(keys: Iterable[str]) -> str:
    """``diffusers``, ``wan``, ``diffsynth`` or ``musubi`` from the key names; ValueError without any LoRA key."""
    keys = list(keys)
    split = [s for s in map(split_key, keys) if s is not None]
    if not split:
        raise ValueError(
            f"no LoRA keys (lora_A/lora_B, lora_down/lora_up, alpha, diff, diff_b) among {len(keys)} key(s), "
            f"e.g. {keys[:3]}"
        )
    if any(module.startswith(_MUSUBI_PREFIX) for module, _ in split):
        return "musubi"
    if any(leaf in _DIFFSYNTH_LEAVES for _, leaf in split):
        return "diffsynth"
    modules = [strip_prefix(module) for module, _ in split]
    original = is_original_layout(modules) or any(_ORIGINAL_ONLY.search(m) for m in modules)
    if original or any(leaf in _COMFY_LEAVES for _, leaf in split):
        return "wan"
    return "diffusers"


def split_key(key: str) -> tuple[str, str] | None:
    """``x.blocks.0.q.lora_down.weight`` -> (``x.blocks.0.q``, ``lora_down.weight``); None for a non-LoRA key."""
    for leaf in _LEAF_ORDER:
        if key.endswith("." + leaf):
            return key[: -len(leaf) - 1], leaf
    return None


def read_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Read a LoRA safetensors file (or the only ``*.safetensors`` of a folder) of any layout."""
    file = lora_file_path(path)
    state = dict(iter_safetensors(file))
    return convert_state_dict(state, source=file, metadata=read_metadata(file))


def lora_file_path(path: str | os.PathLike[str]) -> Path:
    """The file itself, or the single ``*.safetensors`` in a folder; FileNotFoundError / ValueError otherwise."""
    given = Path(path).expanduser()
    if given.is_dir():
        found = sorted(given.glob("*.safetensors"))
        if not found:
            raise FileNotFoundError(f"no *.safetensors LoRA file in folder {given}")
        if len(found) > 1:
            names = ", ".join(f.name for f in found[:4])
            raise ValueError(f"folder {given} holds {len(found)} .safetensors files ({names}): name the LoRA file")
        given = found[0]
    if not given.is_file():
        raise FileNotFoundError(f"LoRA file not found: {given}")
    if given.stat().st_size == 0:
        raise ValueError(f"LoRA file {given} is empty (0 bytes)")
    return given


def read_metadata(file: Path) -> dict[str, Any]:
    """diffusers/peft ``lora_adapter_metadata`` (LoraConfig kwargs) from the header, without a ``transformer.``
    prefix; {} when absent."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"LoRA {file}: unreadable {METADATA_KEY} in the header ({err})") from err
    return {k.removeprefix("transformer."): v for k, v in config.items()}


def convert_state_dict(
    state: Mapping[str, torch.Tensor], source: Path | None = None, metadata: Mapping[str, Any] | None = None
) -> LoraFile:
    """Any layout's tensors -> :class:`LoraFile` keyed by our module names."""
    label = str(source) if source is not None else "<state dict>"
    try:
        layout = detect_layout(state)
    except ValueError as err:
        raise ValueError(f"LoRA {label}: {err}") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[str, dict[str, str]] = {}
    unknown = []
    for key, tensor in state.items():
        split = split_key(key)
        name = None if split is None else our_module_name(split[0], layout)
        if name is None:
            unknown.append(key)
            continue
        part = LEAVES[split[1]]
        if part in parts.setdefault(name, {}):
            raise ValueError(f"LoRA {label}: keys {keys[name][part]!r} and {key!r} are the same tensor of {name}")
        parts[name][part], keys.setdefault(name, {})[part] = tensor, key
    modules = {name: _build_module(name, parts[name], keys[name], metadata or {}, label) for name in parts}
    return LoraFile(layout=layout, modules=modules, source=source, unknown=unknown)


def our_module_name(module: str, layout: str) -> str | None:
    """A file's module name -> ours; None when an original-layout name is unknown."""
    if layout == "musubi":
        module = _musubi_to_original(module.removeprefix(_MUSUBI_PREFIX))
        if module is None:
            return None
    name = strip_prefix(module)
    if layout == "diffusers":
        return name
    ours = original_to_ours(name)
    if ours is not None:
        return ours
    return name if ours_to_original(name) is not None else None  # already one of our names


def _musubi_to_original(name: str) -> str | None:
    """``blocks_0_self_attn_q`` -> ``blocks.0.self_attn.q`` (underscores are ambiguous: look the name up)."""
    block = _MUSUBI_BLOCK.match(name)
    if block:
        inner = _MUSUBI_IN_BLOCK.get(block.group(2))
        return None if inner is None else f"blocks.{block.group(1)}.{inner}"
    return _MUSUBI_TOP_LEVEL.get(name)


def _build_module(
    name: str, parts: dict[str, torch.Tensor], keys: dict[str, str], metadata: Mapping[str, Any], label: str
) -> LoraModule:
    """One module from its parts; a lone lora_A/lora_B/alpha is an error."""
    down, up = parts.get("down"), parts.get("up")
    if (down is None) != (up is None) or (down is None and ("alpha" in parts or "up_bias" in parts)):
        lone = keys.get("down") or keys.get("up") or keys.get("alpha") or keys["up_bias"]
        raise ValueError(f"LoRA {label}: {lone!r} has no matching lora_A/lora_B pair")
    module = LoraModule(down=down, up=up, diff_b=parts.get("diff_b"), diff=parts.get("diff"), keys=keys)
    if "alpha" in parts:
        module.alpha = float(parts["alpha"].float().reshape(-1)[0])
    elif down is not None:
        module.alpha = _metadata_alpha(metadata, name, module.rank)
    if "up_bias" in parts:
        if module.diff_b is not None:
            raise ValueError(f"LoRA {label}: {name} has both {keys['diff_b']!r} and {keys['up_bias']!r}")
        module.diff_b = parts["up_bias"] * (module.alpha_value / module.rank)
    return module


def _metadata_alpha(metadata: Mapping[str, Any], name: str, rank: int) -> float | None:
    """The alpha peft would use for ``name`` from LoraConfig kwargs (alpha_pattern, lora_alpha, rsLoRA)."""
    alpha = metadata.get("lora_alpha")
    for pattern, value in (metadata.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            alpha = value
            break
    if alpha is None:
        return None
    return float(alpha) * (math.sqrt(rank) if metadata.get("use_rslora") else 1.0)


def as_lora_file(path_or_state: str | os.PathLike[str] | LoraFile | Mapping[str, torch.Tensor]) -> LoraFile:
    """A path (file or folder), a state dict of any layout, or an already converted :class:`LoraFile`."""
    if isinstance(path_or_state, LoraFile):
        return path_or_state
    if isinstance(path_or_state, Mapping):
        return convert_state_dict(path_or_state)
    return read_lora(path_or_state)


# ---------------------------------------------------------------------------------------------- matching the model
def match_model(
    transformer: nn.Module, lora: LoraFile, strict: bool = True
) -> tuple[dict[str, LoraModule], dict[str, torch.Tensor]]:
    """Check ``lora`` against the model: shapes (ValueError naming key and both shapes) and names (unknown ones:
    ValueError, or a warning with ``strict=False``). Returns the low-rank modules and the diff/diff_b deltas keyed
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
                deltas[param_name] = getattr(module, part)
        if module.has_lora:
            low_rank[name] = module
    if unknown:
        text = f"LoRA {lora.label}: {len(unknown)} key(s) match no layer of the model, e.g. {unknown[:4]}"
        if strict:
            raise ValueError(text + " (strict=False skips them)")
        warnings.warn(text + "; skipped", stacklevel=3)
    if not low_rank and not deltas:
        raise ValueError(f"LoRA {lora.label}: none of its keys match the model")
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
    """ValueError naming the file key, the module and both shapes when a tensor does not fit the model."""
    shape = list(param.shape)
    if part != "lora":
        tensor, what = getattr(module, part), "bias" if part == "diff_b" else "weight"
        if list(tensor.shape) != shape:
            key = module.keys.get(part) or module.keys.get("up_bias") or f"{name}.{part}"
            raise ValueError(
                f"LoRA {label}: {name} {part} is {list(tensor.shape)} but the model's {what} is {shape} (key {key!r})"
            )
        return
    down, up, rank = module.down, module.up, module.rank
    if up.shape[1] != rank:
        raise ValueError(
            f"LoRA {label}: {name} lora_A is {list(down.shape)} but lora_B is {list(up.shape)} "
            f"(ranks {rank} and {up.shape[1]} differ; key {module.keys.get('up', name)!r})"
        )
    expected = {"down": [rank, *shape[1:]], "up": [shape[0], rank, *[1] * (len(shape) - 2)]}
    for part_name, tensor, label_ab in (("down", down, "lora_A"), ("up", up, "lora_B")):
        if list(tensor.shape) != expected[part_name]:
            raise ValueError(
                f"LoRA {label}: {name} {label_ab} is {list(tensor.shape)} but the model's weight is "
                f"{shape} (key {module.keys.get(part_name, name)!r})"
            )


# ------------------------------------------------------------------------------------------ adapters on the model
@dataclass
class _Adapter:
    scale: float
    deltas: dict[str, torch.Tensor]  # our parameter name -> diff / diff_b at scale 1


@dataclass
class _LoraState:
    """Kept on the transformer: the adapters, which are active, and the original values of parameters that
    diff/diff_b deltas touch."""

    adapters: dict[str, _Adapter] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    enabled: bool = True
    fused: list[str] = field(default_factory=list)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)


def load_lora(
    transformer: nn.Module,
    path_or_state: str | os.PathLike[str] | LoraFile | Mapping[str, torch.Tensor],
    adapter_name: str | None = None,
    scale: float = 1.0,
    strict: bool = True,
) -> str:
    """Attach a LoRA as a new adapter, active at ``scale`` together with those already active; returns its name
    (default: the file stem, made unique)."""
    lora = as_lora_file(path_or_state)
    state = _state(transformer) or _LoraState()
    name = _new_adapter_name(state, adapter_name, lora)
    low_rank, deltas = match_model(transformer, lora, strict)
    setattr(transformer, _STATE_ATTR, state)
    _unfuse(transformer, state)
    if low_rank:
        _inject(transformer, name, low_rank)
    for param_name in deltas:
        state.originals.setdefault(param_name, _param(transformer, param_name).detach().clone())
    state.adapters[name] = _Adapter(scale=float(scale), deltas=deltas)
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
    elif isinstance(scales, int | float):
        scales = [float(scales)] * len(names)
    if len(scales) != len(names):
        raise ValueError(f"set_adapters: {len(names)} adapter name(s) but {len(scales)} scale(s)")
    _unfuse(transformer, state)
    for name, value in zip(names, scales, strict=True):
        state.adapters[name].scale = float(value)
    state.active = names
    _sync(transformer, state)


def disable_lora(transformer: nn.Module) -> None:
    """Run the base model (adapters stay loaded; :func:`enable_lora` brings them back)."""
    state = _require_state(transformer)
    _unfuse(transformer, state)
    state.enabled = False
    _sync(transformer, state)


def enable_lora(transformer: nn.Module) -> None:
    """Undo :func:`disable_lora`."""
    state = _require_state(transformer)
    state.enabled = True
    _sync(transformer, state)


def fuse_lora(transformer: nn.Module, adapter_names: str | list[str] | None = None) -> None:
    """Merge adapters (default: the active ones, at their scales) into the base weights; they become the active
    set. Any later change (set_adapters, disable, load, unload) unfuses first."""
    state = _require_state(transformer)
    state.enabled = True
    set_adapters(transformer, state.active if adapter_names is None else adapter_names)
    for layer in _lora_layers(transformer):
        layer.merge(adapter_names=[n for n in state.active if n in layer.lora_A])
    state.fused = list(state.active)


def unfuse_lora(transformer: nn.Module) -> None:
    """Take fused adapters out of the base weights again (they keep applying, unfused)."""
    state = _state(transformer)
    if state is not None:
        _unfuse(transformer, state)


def unload_lora(transformer: nn.Module) -> None:
    """Remove every adapter: LoRA layers replaced by the plain layers, touched parameters restored exactly."""
    state = _state(transformer)
    if state is None:
        return
    _unfuse(transformer, state)
    with torch.no_grad():
        for name, original in state.originals.items():
            _param(transformer, name).copy_(original)
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
        raise ValueError("no LoRA is loaded (load one with load_lora / load_lora_weights first)")
    return state


def _check_names(state: _LoraState, names: list[str]) -> None:
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; loaded: {list(state.adapters)}")


def _new_adapter_name(state: _LoraState, given: str | None, lora: LoraFile) -> str:
    """``given`` (which must be new and a valid peft name) or the file stem made safe and unique."""
    if given is not None:
        if not _ADAPTER_NAME.match(given):
            raise ValueError(f"adapter name {given!r}: use letters, digits, '_' and '-' only")
        if given in state.adapters:
            raise ValueError(f"adapter name {given!r} is already loaded; pick another or unload first")
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


def lora_config(modules: dict[str, LoraModule]) -> Any:
    """A ``peft.LoraConfig`` for exactly these modules: the most common rank/alpha, the others as patterns."""
    from peft import LoraConfig

    ranks = {name: m.rank for name, m in modules.items()}
    alphas = {name: m.alpha_value for name, m in modules.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(modules),
        rank_pattern={"^" + re.escape(n): r for n, r in ranks.items() if r != rank},
        alpha_pattern={"^" + re.escape(n): a for n, a in alphas.items() if a != alpha},
    )


def _sync(transformer: nn.Module, state: _LoraState) -> None:
    """Bring peft layers (active set, scales, on/off) and the diff/diff_b parameters in line with ``state``."""
    for layer in _lora_layers(transformer):
        layer.enable_adapters(state.enabled)
        layer.set_adapter(list(state.active))
        for name in layer.scaling:
            layer.set_scale(name, state.adapters[name].scale)
    live = [state.adapters[n] for n in state.active] if state.enabled else []
    with torch.no_grad():
        for param_name, original in state.originals.items():
            param = _param(transformer, param_name)
            terms = [
                a.scale * a.deltas[param_name].to(param.device, torch.float32) for a in live if param_name in a.deltas
            ]
            param.copy_(original.to(param.device, torch.float32) + sum(terms) if terms else original)


def _unfuse(transformer: nn.Module, state: _LoraState) -> None:
    if state.fused:
        for layer in _lora_layers(transformer):
            if layer.merged:
                layer.unmerge()
        state.fused = []


def _lora_layers(transformer: nn.Module) -> list[Any]:
    return [m for m in transformer.modules() if _is_lora_layer(m)]


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if _is_lora_layer(module) else module


def _param(transformer: nn.Module, name: str) -> torch.Tensor:
    """Our parameter ``name`` (through a peft wrapper's ``weight``/``bias``)."""
    owner, _, leaf = name.rpartition(".")
    return getattr(transformer.get_submodule(owner) if owner else transformer, leaf)


# --------------------------------------------------------------------------------------------------------- writing
def save_lora(
    source: nn.Module | LoraFile | Mapping[str, LoraModule],
    path: str | os.PathLike[str],
    layout: str = "diffusers",
    adapter_name: str | None = None,
) -> Path:
    """Write a LoRA (an adapter of ``transformer``, a :class:`LoraFile` or modules by our names) as safetensors in
    the ``diffusers`` layout (alpha in diffusers' header metadata) or the ``wan`` (ComfyUI) layout."""
    from safetensors.torch import save_file

    from .io import atomic_path

    if isinstance(source, nn.Module):
        modules = adapter_modules(source, adapter_name)
    else:
        modules = dict(source.modules if isinstance(source, LoraFile) else source)
    if layout == "diffusers":
        tensors, metadata = _to_diffusers(modules)
    elif layout == "wan":
        tensors, metadata = _to_wan(modules), None
    else:
        raise ValueError(f"save_lora: layout {layout!r} is not one of {WRITABLE_LAYOUTS}")
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


def adapter_modules(transformer: nn.Module, adapter_name: str | None = None) -> dict[str, LoraModule]:
    """One loaded adapter back in the internal form (default: the only adapter)."""
    state = _require_state(transformer)
    if adapter_name is None:
        if len(state.adapters) != 1:
            raise ValueError(f"name the adapter to save, one of {list(state.adapters)}")
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


def _to_diffusers(modules: Mapping[str, LoraModule]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``transformer.<ours>.lora_A/B.weight`` and the LoraConfig (rank, alpha, patterns) as diffusers writes it."""
    extra = [n for n, m in modules.items() if m.diff is not None or m.diff_b is not None or not m.has_lora]
    if extra:
        raise ValueError(
            f"the diffusers layout holds lora_A/lora_B only; {extra[:3]} have diff/diff_b deltas: "
            "save with layout='wan'"
        )
    tensors = {}
    for name, m in modules.items():
        tensors[f"transformer.{name}.lora_A.weight"] = m.down
        tensors[f"transformer.{name}.lora_B.weight"] = m.up
    config = lora_config(dict(modules))
    kwargs = {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(modules),
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
    }
    header = {f"transformer.{k}": v for k, v in kwargs.items()}
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(header, sort_keys=True)}


def _to_wan(modules: Mapping[str, LoraModule]) -> dict[str, torch.Tensor]:
    """``diffusion_model.<original>.lora_down/lora_up.weight``, ``.alpha``, ``.diff_b``, ``.diff`` (ComfyUI)."""
    tensors = {}
    for name, m in modules.items():
        base = "diffusion_model." + (ours_to_original(name) or name)
        if m.has_lora:
            tensors[f"{base}.lora_down.weight"], tensors[f"{base}.lora_up.weight"] = m.down, m.up
            tensors[f"{base}.alpha"] = torch.tensor(m.alpha_value, dtype=torch.float32)
        for part in ("diff_b", "diff"):
            if getattr(m, part) is not None:
                tensors[f"{base}.{part}"] = getattr(m, part)
    return tensors
