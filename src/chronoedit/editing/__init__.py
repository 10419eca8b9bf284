"""The application layer: one edit from settings to files, under every front end (CLI, batch, serve).

A front end turns its input into a :class:`ModelSpec` (what to load), :class:`EditSettings` (one edit) and an
:class:`OutputPlan` (where results go); :func:`resolve_model`, :func:`resolve_edit` and :func:`resolve_outputs` check
them once (a preset is applied once, each rule checked once) and raise :class:`~chronoedit.errors.UserError` naming
the field; :func:`load_pipeline`, :func:`generate` and :func:`write_outputs` (or an :class:`EditRunner` that keeps
one pipeline between edits) do the work.
"""

from .resolve import (
    check_lora,
    has_trajectory,
    parse_lora,
    parse_offload,
    read_input,
    resolve_edit,
    resolve_model,
    resolve_outputs,
    resolve_sampling,
    wants_trajectory,
)
from .runner import EditRunner
from .service import (
    DECODE_STAGE,
    QUIET,
    Report,
    checkpoint_path,
    enhance,
    generate,
    load_pipeline,
    run_edit,
    write_outputs,
)
from .settings import (
    DEFAULT_STEPS,
    DEMO,
    DEMO_MAX_AREA,
    DEMO_PROMPT,
    DEMO_STEPS,
    MODEL_PATH_ENV,
    VIDEO_FPS,
    Edit,
    EditSettings,
    LoraSpec,
    ModelSpec,
    OutputPlan,
)

__all__ = [
    "DECODE_STAGE", "DEFAULT_STEPS", "DEMO", "DEMO_MAX_AREA", "DEMO_PROMPT", "DEMO_STEPS", "MODEL_PATH_ENV", "QUIET",
    "VIDEO_FPS",
    "Edit", "EditRunner", "EditSettings", "LoraSpec", "ModelSpec", "OutputPlan", "Report", "check_lora",
    "checkpoint_path", "enhance", "generate", "has_trajectory", "load_pipeline", "parse_lora", "parse_offload",
    "read_input",
    "resolve_edit", "resolve_model", "resolve_outputs", "resolve_sampling", "run_edit", "wants_trajectory",
    "write_outputs",
]  # fmt: skip
