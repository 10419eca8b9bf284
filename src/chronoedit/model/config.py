"""Transformer configuration, read exactly as the real checkpoint's ``transformer/config.json`` has it.

A config that ChronoEdit cannot run (a checkpoint's config.json, or shapes a config is inferred from) is a
:class:`~chronoedit.errors.UserError`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import InitVar, dataclass, field
from typing import Any

from ..errors import UserError

logger = logging.getLogger(__name__)

# Keys a diffusers config carries that say nothing about the architecture.
_BOOKKEEPING_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
# Integer fields and their largest sane value: a config past these is a typo or a hostile file, and building the
# model from it would try to allocate (or loop) for ever before any weight is checked.
_SIZES = {
    "num_attention_heads": 1024, "attention_head_dim": 1024, "in_channels": 4096, "out_channels": 4096,
    "text_dim": 65536, "freq_dim": 65536, "ffn_dim": 1 << 20, "num_layers": 1024, "rope_max_seq_len": 1 << 20,
    "rope_temporal_skip_len": 1024,
}  # fmt: skip
_OPTIONAL_SIZES = {"image_dim": 65536, "added_kv_proj_dim": 1 << 20}


@dataclass
class TransformerConfig:
    """Hyper-parameters of the ChronoEdit DiT; field names are diffusers' config keys.

    The defaults are the 14B model. ``in_channels`` is 36 for ChronoEdit: 16 noisy latents + 4 mask + 16 condition.
    The real checkpoint's config names ``WanTransformer3DModel`` and has no ``rope_temporal_skip_len``: it is 8.
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 36
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = 1280
    added_kv_proj_dim: int | None = 5120
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    rope_temporal_skip_len: int = 8
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    where: InitVar[str] = "transformer config"  # how errors name the config: its file, when there is one

    def __post_init__(self, where: str) -> None:
        problem = _type_problem(self) or self._model_problem()
        if problem:
            raise UserError(f"{where}: {problem}")
        self.patch_size = tuple(self.patch_size)  # type: ignore[assignment]

    def _model_problem(self) -> str | None:
        """Why ChronoEdit cannot run a config whose values have the right types, or None."""
        if self.qk_norm != "rms_norm_across_heads":
            return f"unsupported qk_norm {self.qk_norm!r} (ChronoEdit uses rms_norm_across_heads)"
        if self.pos_embed_seq_len is not None:
            return "pos_embed_seq_len is a Wan FLF2V feature that ChronoEdit does not use"
        if self.rope_temporal_skip_len < 2:
            return f"rope_temporal_skip_len must be >= 2, got {self.rope_temporal_skip_len}"
        return None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "transformer config") -> TransformerConfig:
        """Build from a diffusers ``config.json`` dict; unknown keys are kept in ``extra`` and logged, not fatal.
        ``where`` names the config in errors (its file)."""
        if not isinstance(raw, dict):
            raise UserError(f"{where}: expected a JSON object of settings, got a JSON {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known and k not in _BOOKKEEPING_KEYS}
        if extra:
            logger.info("transformer config: ignoring keys %s", sorted(extra))
        return cls(**kwargs, extra=extra, where=where)

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], head_dim: int = 128) -> TransformerConfig:
        """Infer the config of a checkpoint that has none (a single file) from its tensor shapes (our key names).

        Every Wan2.1 model uses 128-channel heads, so the head count is the width over 128.
        """
        try:
            dim, in_channels, *patch = shapes["patch_embedding.weight"]
            layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
            image = shapes.get("condition_embedder.image_embedder.norm1.weight")
            added_kv = shapes.get("blocks.0.attn2.add_k_proj.weight")
            return cls(
                patch_size=tuple(patch),  # type: ignore[arg-type]
                num_attention_heads=dim // head_dim,
                attention_head_dim=head_dim,
                in_channels=in_channels,
                out_channels=shapes["proj_out.weight"][0] // (patch[0] * patch[1] * patch[2]),
                text_dim=shapes["condition_embedder.text_embedder.linear_1.weight"][1],
                freq_dim=shapes["condition_embedder.time_embedder.linear_1.weight"][1],
                ffn_dim=shapes["blocks.0.ffn.net.0.proj.weight"][0],
                num_layers=layers,
                cross_attn_norm="blocks.0.norm2.weight" in shapes,
                image_dim=None if image is None else image[0],
                added_kv_proj_dim=None if added_kv is None else added_kv[1],
            )
        except (KeyError, ValueError, IndexError) as err:
            raise UserError(f"cannot infer the transformer config from the weights: no or bad {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """The diffusers-style config dict, naming our class and keeping the temporal skip explicit."""
        out = {"_class_name": "ChronoEditTransformer3DModel"}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _type_problem(config: TransformerConfig) -> str | None:
    """The first value of ``config`` with the wrong JSON type or out of range, in words naming its key; or None."""
    for key, largest in _SIZES.items():
        least = 0 if key == "num_layers" else 1  # a model without blocks is still a model (tests, parts)
        if not _whole(getattr(config, key), largest, least):
            return f"{key} must be a whole number from {least} to {largest}, got {getattr(config, key)!r}"
    for key, largest in _OPTIONAL_SIZES.items():
        value = getattr(config, key)
        if value is not None and not _whole(value, largest):
            return f"{key} must be null or a whole number from 1 to {largest}, got {value!r}"
    patch = config.patch_size
    if not isinstance(patch, (list, tuple)) or len(patch) != 3 or not all(_whole(p, 64) for p in patch):
        return f"patch_size must be 3 whole numbers from 1 to 64, got {patch!r}"
    if not isinstance(config.cross_attn_norm, bool):
        return f"cross_attn_norm must be true or false, got {config.cross_attn_norm!r}"
    if not isinstance(config.qk_norm, str):
        return f"qk_norm must be a string, got {config.qk_norm!r}"
    eps = config.eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and 0 < eps < 1):
        return f"eps must be a number between 0 and 1, got {eps!r}"
    return None


def _whole(value: Any, largest: int, least: int = 1) -> bool:
    """An int (not a bool) from ``least`` to ``largest``."""
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= largest
