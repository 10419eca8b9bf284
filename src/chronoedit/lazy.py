"""Low-memory mode's components: each built when its stage starts and dropped when the stage ends, so the peak
memory is the largest stage's, not the sum of all components.

A :class:`LazyComponent` stands in for a module on the pipeline: what the pipeline reads outside a stage (``config``,
``dtype``, a size estimate for making room on the device) it answers without loading; a stage takes the module with
:func:`chronoedit.memory.resident` and lets it go at the end.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch


class LazyComponent:
    """``load()`` builds the module (on the CPU) when a stage needs it; ``release()`` drops it again."""

    def __init__(self, name: str, load: Callable[[], torch.nn.Module], config: Any = None, nbytes: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        self.name, self._load, self.config, self.nbytes, self.dtype = name, load, config, nbytes, dtype
        self.module: torch.nn.Module | None = None
        self.loads = 0  # how many times it was built (tests, reports)

    def acquire(self) -> torch.nn.Module:
        """The module, built now if it is not alive."""
        if self.module is None:
            self.module = self._load()
            self.loads += 1
        return self.module

    def release(self) -> None:
        """Drop the module (its memory returns once nothing else holds it)."""
        self.module = None
        gc.collect()

    def __repr__(self) -> str:
        return f"LazyComponent({self.name!r}, {'loaded' if self.module is not None else 'not loaded'})"


def materialize(component: Any) -> Any:
    """The module behind ``component`` (built if lazy); any other component as it is."""
    return component.acquire() if isinstance(component, LazyComponent) else component
