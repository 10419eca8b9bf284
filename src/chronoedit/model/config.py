"""Transformer configuration, read exactly as the real checkpoint's ``transformer/config.json`` has it.

A config that ChronoEdit cannot run (a checkpoint's config.json, or shapes a config is inferred from) is a
:class:`~chronoedit.errors.UserError`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

logger = logging.getLogger(__name__)

# Keys a diffusers config carries that say nothing about the architecture.
_BOOKKEEPING_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


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

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if len(self.patch_size) != 3:
            raise UserError(f"transformer config: patch_size must have 3 entries, got {list(self.patch_size)}")
        if self.qk_norm != "rms_norm_across_heads":
            raise UserError(
                f"transformer config: unsupported qk_norm {self.qk_norm!r} (ChronoEdit uses rms_norm_across_heads)"
            )
        if self.pos_embed_seq_len is not None:
            raise UserError("transformer config: pos_embed_seq_len is a Wan FLF2V feature that ChronoEdit does not use")
        if self.rope_temporal_skip_len < 2:
            raise UserError(
                f"transformer config: rope_temporal_skip_len must be >= 2, got {self.rope_temporal_skip_len}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TransformerConfig:
        """Build from a diffusers ``config.json`` dict; unknown keys are kept in ``extra`` and logged, not fatal."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known and k not in _BOOKKEEPING_KEYS}
        if extra:
            logger.info("transformer config: ignoring keys %s", sorted(extra))
        return cls(**kwargs, extra=extra)

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
