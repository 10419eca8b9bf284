"""Labelling before/after image pairs into a ChronoEdit training dataset (``chronoedit label``).

:mod:`.pairs` finds the pairs (a folder or a CSV), :mod:`.prompts` holds the two VLM stages (an instruction, then the
dense "The user wants to ..." rewrite), :mod:`.dataset` writes the resumable dataset folder (``metadata.csv`` with
``key,video,prompt,source_image,target_image``) and :mod:`.run` ties them together.
"""

from __future__ import annotations

from .dataset import METADATA_COLUMNS, open_dataset, read_metadata
from .pairs import Pair, PairsError, read_pairs
from .run import Summary, label_pairs

__all__ = ["METADATA_COLUMNS", "Pair", "PairsError", "Summary", "label_pairs", "open_dataset", "read_metadata",
           "read_pairs"]  # fmt: skip
