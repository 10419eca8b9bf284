"""Pure model code: no IO, devices or CLI. Loading a checkpoint (``from_pretrained``) is ``chronoedit.loading``'s:
``chronoedit.ChronoEditTransformer3DModel`` is this package's model with it."""

from .config import TransformerConfig
from .transformer import ChronoEditTransformer3DModel

__all__ = ["ChronoEditTransformer3DModel", "TransformerConfig"]
