"""One loaded pipeline that runs many edits (``chronoedit batch`` and ``chronoedit serve``).

Each :class:`~chronoedit.editing.Edit` names its own LoRAs (the model's, plus its preset's) and flow shift. The runner
loads every LoRA file once, the first time an edit needs it, and before each edit makes exactly that edit's LoRAs
active at their scales (none: the base model), so edits with different presets can follow each other without
reloading the model.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .service import QUIET, OnStep, Report, generate, load_pipeline
from .settings import Edit, LoraSpec, ModelSpec

# One load at a time in the process: loading builds modules on the meta device through process-wide hooks, which two
# loads at once corrupt (two runners too: a server restarted in-process while its old worker still loads).
_LOADING = threading.RLock()


class EditRunner:
    """Loads the pipeline of ``spec`` on first use (with ``spec``'s LoRAs, so a bad one fails at start, not at every
    edit) and runs edits on it. ``load`` is the loader (the application layer's by default; tests pass their own)."""

    def __init__(self, spec: ModelSpec, report: Report = QUIET,
                 load: Callable[[ModelSpec, Report], Any] = load_pipeline) -> None:  # fmt: skip
        self.spec, self.report, self._load = spec, report, load
        self.pipe: Any = None
        self.adapters: dict[Path, str] = {}  # resolved LoRA file -> adapter name

    def load(self) -> Any:
        """The pipeline, loaded the first time with the spec's LoRAs active. Callers in other threads wait for the
        one load."""
        with _LOADING:
            if self.pipe is None:
                pipe = self._load(dataclasses.replace(self.spec, loras=()), self.report)
                pipe.set_progress_bar_config(disable=not self.report.progress_bar)
                self._activate(pipe, self.spec.loras)
                self.pipe = pipe
        return self.pipe

    def activate(self, edit: Edit) -> list[str]:
        """Make exactly ``edit``'s LoRAs active at their scales; returns the adapter names."""
        return self._activate(self.load(), edit.loras)

    def _activate(self, pipe: Any, loras: tuple[LoraSpec, ...]) -> list[str]:
        """Load the LoRA files not loaded yet, then make exactly ``loras`` active at their scales."""
        names = []
        for lora in loras:
            key = lora.path.resolve()
            if key not in self.adapters:
                self.report.stage(f"loading LoRA {lora.path} (scale {lora.scale:g})")
                self.adapters[key] = pipe.load_lora_weights(str(lora.path), scale=lora.scale,
                                                            strict=self.spec.lora_strict)  # fmt: skip
            names.append(self.adapters[key])
        if names:
            pipe.enable_lora()
            pipe.set_adapters(names, [lora.scale for lora in loras])
        elif self.adapters:
            pipe.disable_lora()
        return names

    def run(self, edit: Edit, return_trajectory: bool = False, on_step: OnStep | None = None,
            report: Report | None = None) -> Any:  # fmt: skip
        """Run one edit (outputs not written): its LoRAs, then the pipeline; its stages go to ``report`` (default:
        the runner's)."""
        self.activate(edit)
        return generate(self.pipe, edit, return_trajectory, on_step=on_step, report=report or self.report)

