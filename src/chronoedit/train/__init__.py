"""Training ChronoEdit: LoRA or full fine-tuning on edit pairs and reasoning videos, with accelerate.

:mod:`.config` the settings; :mod:`.data` the dataset CSV; :mod:`.cache` the encoders' outputs precomputed on disk;
:mod:`.flow` the flow-matching objective; :mod:`.dataset` the seeded stream of items; :mod:`.lora` the trainable
part; :mod:`.checkpoints` resumable checkpoints, :mod:`.state` what they hold (tensors and plain data only);
:mod:`.validation` validation edits; :mod:`.loop` ``train``.
Heavy libraries load only when training starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import TrainConfig, build_config, read_config_file

if TYPE_CHECKING:
    from .loop import TrainResult

__all__ = ["TrainConfig", "build_config", "read_config_file", "train"]


def train(config: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """See :func:`chronoedit.train.loop.train`."""
    from .loop import train as _train

    return _train(config, log)
