"""LoRA files: one form (:class:`LoraModule` per module, :class:`LoraFile` per file) for every layout in the wild.

Layouts (``detect_layout``), all converted to one form keyed by our module names (``blocks.0.attn1.to_q``):

- ``diffusers``: ``[transformer.]blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B.weight`` (+ ``.alpha`` keys or
  diffusers' ``lora_adapter_metadata``; ``lora_B.bias`` as written by diffusers for ``diff_b``);
- ``wan``: original Wan / ComfyUI names, ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` / ``lora_up`` (or
  ``lora_A`` / ``lora_B``), ``.alpha``, ``.diff_b`` (bias delta), ``.diff`` (full weight delta, e.g. of norms);
- ``diffsynth``: DiffSynth training output, ``blocks.0.self_attn.q.lora_A.default.weight``;
- ``musubi``: musubi-tuner, ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` (+ ``.alpha``).

Every tensor read is checked: NaN/Inf values, an alpha that is not one finite number and a lora_A/lora_B that is not
a matrix of rank >= 1 are refused with one line naming the file and the key (:func:`check_values` checks a
:class:`LoraFile` built in memory). Writing (:func:`write_lora`) covers the ``diffusers`` and ``wan`` layouts, and
``wan_ab``: Wan names with ``lora_A``/``lora_B`` and alpha folded into ``lora_B`` (``.alpha`` = rank), the one file
DiffSynth's ``load_lora`` (which matches ``.lora_B.`` keys and ignores ``.alpha``), ComfyUI and diffusers all read
alike.
Attaching a LoRA to the model is :mod:`chronoedit.lora.adapters`; saving an adapter of a model,
:func:`chronoedit.lora.saving.save_lora`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import check_regular
from ..keymap import IN_BLOCK, TOP_LEVEL, is_original_layout, original_to_ours, ours_to_original, strip_prefix
from ..loading import iter_safetensors

LAYOUTS = ("diffusers", "wan", "diffsynth", "musubi")
WRITABLE_LAYOUTS = ("diffusers", "wan", "wan_ab")
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
    """``diffusers``, ``wan``, ``diffsynth`` or ``musubi`` from the key names; UserError without any LoRA key."""
    keys = list(keys)
    split = [s for s in map(split_key, keys) if s is not None]
    if not split:
        raise UserError(
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
    """The file itself, or the single ``*.safetensors`` in a folder; FileNotFoundError / UserError otherwise."""
    given = Path(path).expanduser()
    if given.is_dir():
        found = sorted(given.glob("*.safetensors"))
        if not found:
            raise FileNotFoundError(f"no *.safetensors LoRA file in folder {given}")
        if len(found) > 1:
            names = ", ".join(f.name for f in found[:4])
            raise UserError(f"folder {given} holds {len(found)} .safetensors files ({names}): name the LoRA file")
        given = found[0]
    if not given.exists():
        raise FileNotFoundError(f"LoRA file not found: {given}")
    check_regular(given, "LoRA file")  # a named pipe would block the reader
    if given.stat().st_size == 0:
        raise UserError(f"LoRA file {given} is empty (0 bytes)")
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
        raise UserError(f"LoRA {file}: unreadable {METADATA_KEY} in the header ({err})") from err
    if not isinstance(config, dict):
        raise UserError(f"LoRA {file}: {METADATA_KEY} in the header is not a JSON object")
    return {k.removeprefix("transformer."): v for k, v in config.items()}


def convert_state_dict(
    state: Mapping[str, torch.Tensor], source: Path | None = None, metadata: Mapping[str, Any] | None = None
) -> LoraFile:
    """Any layout's tensors -> :class:`LoraFile` keyed by our module names."""
    label = str(source) if source is not None else "<state dict>"
    try:
        layout = detect_layout(state)
    except ValueError as err:
        raise UserError(f"LoRA {label}: {err}") from None
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
        if not all_finite(tensor):
            raise UserError(f"LoRA {label}: key {key!r} holds NaN/Inf values")
        if part in parts.setdefault(name, {}):
            raise UserError(f"LoRA {label}: keys {keys[name][part]!r} and {key!r} are the same tensor of {name}")
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
        raise UserError(f"LoRA {label}: {lone!r} has no matching lora_A/lora_B pair")
    for part, tensor in (("down", down), ("up", up)):
        if tensor is not None and (tensor.dim() < 2 or tensor.shape[0 if part == "down" else 1] == 0):
            raise UserError(f"LoRA {label}: key {keys[part]!r} is {list(tensor.shape)}, not a matrix of rank >= 1")
    module = LoraModule(down=down, up=up, diff_b=parts.get("diff_b"), diff=parts.get("diff"), keys=keys)
    if "alpha" in parts:
        module.alpha = _alpha(parts["alpha"], keys["alpha"], label)
    elif down is not None:
        module.alpha = _metadata_alpha(metadata, name, module.rank, label)
    if "up_bias" in parts:
        if module.diff_b is not None:
            raise UserError(f"LoRA {label}: {name} has both {keys['diff_b']!r} and {keys['up_bias']!r}")
        module.diff_b = parts["up_bias"] * (module.alpha_value / module.rank)
    return module


def _alpha(tensor: torch.Tensor, key: str, label: str) -> float:
    """An ``.alpha`` tensor as a number: it must hold exactly one value (finite: checked with every tensor)."""
    if tensor.numel() != 1 or tensor.is_complex():
        raise UserError(f"LoRA {label}: key {key!r} is {list(tensor.shape)} {_dtype_name(tensor)}, not one number")
    return float(tensor.float().reshape(()))


def _metadata_alpha(metadata: Mapping[str, Any], name: str, rank: int, label: str) -> float | None:
    """The alpha peft would use for ``name`` from LoraConfig kwargs (alpha_pattern, lora_alpha, rsLoRA); UserError
    when the header's alpha is not a finite number or a pattern is no regular expression."""
    where = f"LoRA {label}: {METADATA_KEY} in the header"
    alpha, patterns = metadata.get("lora_alpha"), metadata.get("alpha_pattern") or {}
    if not isinstance(patterns, Mapping):
        raise UserError(f"{where} has an alpha_pattern that is not a mapping: {patterns!r:.80}")
    for pattern, value in patterns.items():
        try:
            found = re.match(rf"(.*\.)?({pattern})$", name)
        except re.error as err:
            raise UserError(
                f"{where} has an alpha_pattern {pattern!r:.80} that is no regular expression ({err})"
            ) from None
        if found:
            alpha = value
            break
    if alpha is None:
        return None
    if not _is_finite_number(alpha):
        raise UserError(f"{where} gives {name} the alpha {alpha!r:.80}, not a finite number")
    return float(alpha) * (math.sqrt(rank) if metadata.get("use_rslora") else 1.0)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf in ``tensor`` (integer and bool tensors always pass; float8_e4m3fn, which has no isfinite kernel,
    is checked in float16, which holds every float8 value)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    if tensor.is_floating_point() and tensor.element_size() == 1:
        tensor = tensor.to(torch.float16)
    return bool(torch.isfinite(tensor).all())


def check_values(lora: LoraFile) -> LoraFile:
    """UserError naming the module and part when a LoRA built in memory holds NaN/Inf (in a tensor or its alpha);
    files are checked key by key as they are read."""
    for name, module in lora.modules.items():
        if module.alpha is not None and not _is_finite_number(module.alpha):
            raise UserError(f"LoRA {lora.label}: {_part_name(module, name, 'alpha')} is {module.alpha!r}, not finite")
        for part in ("down", "up", "diff_b", "diff"):
            tensor = getattr(module, part)
            if tensor is not None and not all_finite(tensor):
                raise UserError(f"LoRA {lora.label}: {_part_name(module, name, part)} holds NaN/Inf values")
    return lora


def _part_name(module: LoraModule, name: str, part: str) -> str:
    """``key '<the file's key>'`` when known, else ``<module> <part>``."""
    key = module.keys.get(part)
    return f"key {key!r}" if key else f"{name} {part}"


def _is_finite_number(value: Any) -> bool:
    """A real, finite number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def as_lora_file(path_or_state: str | os.PathLike[str] | LoraFile | Mapping[str, torch.Tensor]) -> LoraFile:
    """A path (file or folder), a state dict of any layout, or an already converted :class:`LoraFile`."""
    if isinstance(path_or_state, LoraFile):
        return check_values(path_or_state)
    if isinstance(path_or_state, Mapping):
        return convert_state_dict(path_or_state)
    return read_lora(path_or_state)


# ------------------------------------------------------------------------------------------------------------- writing
def write_lora(
    source: LoraFile | Mapping[str, LoraModule], path: str | os.PathLike[str], layout: str = "diffusers"
) -> Path:
    """Write a LoRA (a :class:`LoraFile` or modules by our names) as safetensors in the ``diffusers`` layout (alpha
    in diffusers' header metadata), the ``wan`` (ComfyUI) layout, or ``wan_ab`` (Wan names, ``lora_A``/``lora_B``,
    alpha folded into ``lora_B``). An adapter of a model: :func:`chronoedit.lora.save_lora`."""
    from safetensors.torch import save_file

    from ..files import atomic_path

    modules = dict(source.modules if isinstance(source, LoraFile) else source)
    if layout == "diffusers":
        tensors, metadata = _to_diffusers(modules)
    elif layout in ("wan", "wan_ab"):
        tensors, metadata = _to_wan(modules, fold_alpha=layout == "wan_ab"), None
    else:
        raise UserError(f"LoRA layout {layout!r} cannot be written: not one of {WRITABLE_LAYOUTS}")
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


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


def _to_diffusers(modules: Mapping[str, LoraModule]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``transformer.<ours>.lora_A/B.weight`` and the LoraConfig (rank, alpha, patterns) as diffusers writes it."""
    extra = [n for n, m in modules.items() if m.diff is not None or m.diff_b is not None or not m.has_lora]
    if extra:
        raise UserError(
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


def _to_wan(modules: Mapping[str, LoraModule], fold_alpha: bool = False) -> dict[str, torch.Tensor]:
    """``diffusion_model.<original>.lora_down/lora_up.weight``, ``.alpha``, ``.diff_b``, ``.diff`` (ComfyUI);
    ``fold_alpha``: ``lora_A``/``lora_B`` instead, ``lora_B`` times alpha/rank and ``.alpha`` = rank (scale 1 for
    loaders that read ``.alpha``; the same delta for those that ignore it)."""
    down_leaf, up_leaf = ("lora_A", "lora_B") if fold_alpha else ("lora_down", "lora_up")
    tensors = {}
    for name, m in modules.items():
        base = "diffusion_model." + (ours_to_original(name) or name)
        if m.has_lora:
            up, alpha = m.up, m.alpha_value
            if fold_alpha and alpha != m.rank:
                up, alpha = (up.float() * (alpha / m.rank)).to(up.dtype), float(m.rank)
            tensors[f"{base}.{down_leaf}.weight"], tensors[f"{base}.{up_leaf}.weight"] = m.down, up
            tensors[f"{base}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        for part in ("diff_b", "diff"):
            if getattr(m, part) is not None:
                tensors[f"{base}.{part}"] = getattr(m, part)
    return tensors
