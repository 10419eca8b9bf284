"""Pure model code: no IO, devices or CLI."""

from .config import TransformerConfig
from .transformer import ChronoEditTransformer3DModel

__all__ = ["ChronoEditTransformer3DModel", "TransformerConfig"]
