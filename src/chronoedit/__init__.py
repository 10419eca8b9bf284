"""ChronoEdit: physically consistent image editing by video generation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ChronoEditPipeline", "ChronoEditPipelineOutput", "ChronoEditTransformer3DModel", "TransformerConfig"]

if TYPE_CHECKING:
    from .loading import ChronoEditTransformer3DModel
    from .model import TransformerConfig
    from .pipeline import ChronoEditPipeline, ChronoEditPipelineOutput

_LAZY = {
    "ChronoEditTransformer3DModel": "chronoedit.loading",  # the model with from_pretrained (chronoedit.model: no IO)
    "TransformerConfig": "chronoedit.model",
    "ChronoEditPipeline": "chronoedit.pipeline",
    "ChronoEditPipelineOutput": "chronoedit.pipeline",
}


def __getattr__(name: str) -> Any:
    """Import the public classes on first use, so ``import chronoedit`` stays cheap."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'chronoedit' has no attribute {name!r}")
