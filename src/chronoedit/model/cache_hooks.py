"""diffusers' cache hooks on our transformer: the protocol they need, spoken by our model.

diffusers' step caches (``FirstBlockCacheConfig``, ``MagCacheConfig``, ``TaylorSeerCacheConfig``, ...) hook the
blocks of a model's ``blocks`` ModuleList and read a block's ``hidden_states`` argument by name and its output by
the index its class registered in ``TransformerBlockRegistry``; they keep one state per cache context
(``model.cache_context(name)``). :class:`CacheHooks` gives our transformer diffusers' ``CacheMixin`` methods by
delegation, registering our block's metadata first. diffusers is imported only when a cache is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


def register_block_metadata(block_class: type[nn.Module]) -> None:
    """Tell diffusers' hooks where ``block_class`` (forward(hidden_states, encoder_hidden_states, temb,
    rotary_emb) -> hidden_states) keeps its hidden states: argument ``hidden_states``, the output itself."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    if block_class not in TransformerBlockRegistry._registry:
        metadata = TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None)
        TransformerBlockRegistry.register(block_class, metadata)


class CacheHooks:
    """diffusers' ``CacheMixin`` API (``enable_cache``, ``disable_cache``, ``cache_context``,
    ``is_cache_enabled``) for a model whose blocks are ``self.blocks``; the work is diffusers'."""

    _cache_config: Any = None

    @property
    def is_cache_enabled(self) -> bool:
        return self._cache_config is not None

    def enable_cache(self, config: Any) -> None:
        """Hook a diffusers cache config onto the blocks, e.g. ``FirstBlockCacheConfig(threshold=0.05)``."""
        from diffusers.models.cache_utils import CacheMixin

        register_block_metadata(type(self.blocks[0]))  # type: ignore[attr-defined]
        CacheMixin.enable_cache(self, config)  # type: ignore[arg-type]

    def disable_cache(self) -> None:
        """Remove the cache hooks (nothing to do without a cache)."""
        from diffusers.models.cache_utils import CacheMixin

        if self.is_cache_enabled:
            CacheMixin.disable_cache(self)  # type: ignore[arg-type]

    @contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """Calls inside share the cache state called ``name`` (one per CFG branch: "cond", "uncond")."""
        from diffusers.models.cache_utils import CacheMixin

        with CacheMixin.cache_context(self, name, **kwargs):  # type: ignore[arg-type]
            yield

    def reset_cache(self, recurse: bool = True) -> None:
        """Forget every cache state (a new edit, or the reasoning frames dropped: the token count changed)."""
        if self.is_cache_enabled:
            from diffusers.models.cache_utils import CacheMixin

            CacheMixin._reset_stateful_cache(self, recurse)  # type: ignore[arg-type]

    _reset_stateful_cache = reset_cache  # the name diffusers' pipelines call after each run
