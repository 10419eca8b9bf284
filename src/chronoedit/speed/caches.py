"""Step caches by name: ``--cache NAME[:VALUE]`` -> one of diffusers' cache configs for the transformer.

- ``first-block[:THRESHOLD]`` (0.05): ``FirstBlockCacheConfig(threshold)``; the other blocks are skipped (their
  last residual reused) while the first block's residual changed by less than the threshold (relative mean).
- ``taylorseer[:INTERVAL]`` (5): ``TaylorSeerCacheConfig(cache_interval=N, use_lite_mode=True)``; after 3 warm-up
  steps a full forward every N steps, the output predicted by a first-order Taylor expansion in between.
- ``none``: no cache.

MagCache needs magnitude ratios calibrated for the checkpoint and scheduler: use it from Python,
``pipe(..., cache=MagCacheConfig(...))`` or ``pipe.transformer.enable_cache(MagCacheConfig(...))``.
A name is checked here without importing diffusers; :func:`cache_config` builds the config when the edit runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

FIELD = "cache"


@dataclass(frozen=True)
class _Kind:
    value_name: str
    default: float
    low: float
    high: float
    integer: bool = False


KINDS = {
    "first-block": _Kind("threshold", 0.05, 0.0, 1.0),
    "taylorseer": _Kind("interval", 5, 1, 1000, integer=True),
}
CACHE_NAMES = (*KINDS, "none")


@dataclass(frozen=True)
class CacheSpec:
    """A step cache by name and its one value (threshold or interval)."""

    name: str
    value: float

    def __str__(self) -> str:
        return f"{self.name}:{self.value:g}"


def parse_cache(text: Any) -> CacheSpec | None:
    """``"first-block:0.05"``, ``"taylorseer"``, ``"none"`` / None / ``""`` -> the spec (None: no cache); a
    UserError naming ``{cache}`` otherwise."""
    if text is None or isinstance(text, CacheSpec):
        return text
    if not isinstance(text, str):
        raise UserError(f"{{cache}} must be a name such as first-block:0.05, got {text!r}", FIELD)
    name, _, raw = text.strip().lower().partition(":")
    if name in ("", "none", "off"):
        return None
    kind = KINDS.get(name)
    if kind is None:
        raise UserError(f"{{cache}}: unknown cache {name!r}; choose from {', '.join(CACHE_NAMES)}", FIELD)
    if not raw:
        return CacheSpec(name, kind.default)
    what = "an integer" if kind.integer else "a number"
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{{cache}}: the {kind.value_name} of {name} must be {what}, got {raw!r}", FIELD) from None
    if not math.isfinite(value) or not kind.low <= value <= kind.high or (kind.integer and value != int(value)):
        raise UserError(f"{{cache}}: the {kind.value_name} of {name} must be {what} from {kind.low:g} to "
                        f"{kind.high:g}, got {raw}", FIELD)  # fmt: skip
    return CacheSpec(name, value)


def cache_config(cache: Any) -> Any:
    """A diffusers cache config for ``cache`` (a name, a :class:`CacheSpec`, or a diffusers config as is); None
    for no cache."""
    if cache is None or type(cache).__module__.startswith("diffusers."):
        return cache
    spec = parse_cache(cache)
    if spec is None:
        return None
    import torch
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if spec.name == "first-block":
        return FirstBlockCacheConfig(threshold=spec.value)
    return TaylorSeerCacheConfig(cache_interval=int(spec.value), use_lite_mode=True, taylor_factors_dtype=torch.float32)
