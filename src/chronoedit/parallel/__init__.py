"""Several processes for one run.

- :mod:`.ranks`: who am I in a ``torchrun`` launch, which device is mine, the process group;
- :mod:`.layout`: how one edit's ranks share the work (CFG branches x Ulysses x ring), checked before loading;
- :mod:`.context` and :mod:`.attention`: context parallelism for the transformer and the sampling loop.
"""

from .context import ContextParallel
from .layout import Layout, choose_layout
from .ranks import SINGLE, Ranks, from_env

__all__ = ["SINGLE", "ContextParallel", "Layout", "Ranks", "choose_layout", "from_env"]
