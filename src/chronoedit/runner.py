"""One loaded pipeline that runs many edits (``chronoedit batch`` and ``chronoedit serve``).

Each :class:`~chronoedit.commands.edit.EditJob` may name its own LoRAs (a preset's, or the user's) and flow shift.
The runner loads every LoRA file once, the first time a job needs it, and before each job makes exactly that job's
LoRAs active at that job's scales (none: the base model), so jobs with different presets can follow each other
without reloading the model.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .commands import edit as edit_cmd

# One load at a time in the process: loading builds modules on the meta device through process-wide hooks, which two
# loads at once corrupt (two runners too: a server restarted in-process while its old worker still loads).
_LOADING = threading.RLock()


class EditRunner:
    """Loads the pipeline of ``base`` (its model, transformer, device and dtype) on first use; runs jobs on it."""

    def __init__(self, base: edit_cmd.EditJob) -> None:
        self.base = dataclasses.replace(base, loras=[])  # LoRAs are per job, attached by :meth:`activate`
        self.base_loras = list(base.loras)  # loaded with the model, so a bad one fails at start, not every job
        self.pipe: Any = None
        self.adapters: dict[Path, str] = {}  # resolved LoRA file -> adapter name

    def load(self) -> Any:
        """The pipeline, loaded the first time with ``base``'s LoRAs (errors propagate: nothing can run without
        it). Callers in other threads wait for the one load (see :data:`_LOADING`)."""
        with _LOADING:
            if self.pipe is None:
                pipe = edit_cmd.load_pipeline(self.base)
                self.pipe = pipe
                try:
                    self.activate(dataclasses.replace(self.base, loras=self.base_loras))
                except BaseException:
                    self.pipe, self.adapters = None, {}
                    raise
        return self.pipe

    def activate(self, job: edit_cmd.EditJob) -> list[str]:
        """Make exactly ``job``'s LoRAs active at their scales and set its flow shift; returns the adapter names."""
        pipe = self.load()
        names = []
        for path, scale in job.loras:
            key = path.resolve()
            if key not in self.adapters:
                self.adapters[key] = pipe.load_lora_weights(str(path), scale=scale, strict=job.lora_strict)
            names.append(self.adapters[key])
        if names:
            pipe.enable_lora()
            pipe.set_adapters(names, [scale for _, scale in job.loras])
        elif self.adapters:
            pipe.disable_lora()
        pipe.set_flow_shift(job.flow_shift)
        return names

    def run(self, job: edit_cmd.EditJob, on_step: Callable[[int, int], None] | None = None) -> Any:
        """Run one edit (outputs not written): its LoRAs and flow shift, then the pipeline."""
        self.activate(job)
        return edit_cmd.generate(self.pipe, job, on_step=on_step)
