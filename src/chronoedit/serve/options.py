"""What a client may ask of an edit (``POST /v1/edits``), and the server's limits.

Options are a closed set: unknown names, wrong types and out-of-range values are rejected before anything is queued.
Paths are never accepted from a client: the server names every file it reads or writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserError
from ..presets import PRESETS

MEDIA_TYPES = {
    "png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "mp4": "video/mp4",
    "txt": "text/plain; charset=utf-8",
}  # fmt: skip
PresetName = Literal[tuple(sorted(PRESETS))]  # type: ignore[valid-type]


class EditOptions(BaseModel):
    """The JSON ``options`` part of ``POST /v1/edits``. Unset values take the server's defaults (and a preset's)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True, allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=4000, description="the edit instruction")
    negative_prompt: str | None = Field(default=None, max_length=4000)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="random when left out")
    num_inference_steps: int | None = Field(default=None, ge=1, le=10_000, description="denoising steps")
    guidance_scale: float | None = Field(default=None, ge=0, le=30)
    enable_temporal_reasoning: bool = False
    num_temporal_reasoning_steps: int | None = Field(default=None, ge=0, le=10_000)
    preset: PresetName | None = None  # type: ignore[valid-type]
    output_format: Literal["png", "jpeg", "jpg", "webp"] = "png"
    return_trajectory: bool = Field(
        default=False, description="also keep the reasoning trajectory (video and contact sheet)"
    )
    enhance_prompt: bool = Field(
        default=False,
        description="rewrite the prompt with the server's prompt enhancer (a VLM) into ChronoEdit's dense form first",
    )
    cache: str | None = Field(
        default=None, max_length=40, pattern=r"^[A-Za-z0-9_.:-]*$",
        description="step cache NAME[:VALUE]: first-block[:threshold], taylorseer[:interval] or none (faster, not "
        "identical)",
    )  # fmt: skip
    cfg_batch: bool | None = Field(
        default=None, description="both guidance branches in one forward (default true; same result)"
    )


@dataclass(frozen=True)
class Limits:
    """What one request may cost (checked before a job is queued), and how long its results stay."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_input_pixels: int = 4096 * 4096
    max_queue: int = 100  # queued + running jobs
    max_steps: int = 100
    max_reasoning_steps: int = 100
    keep_results_hours: float | None = None  # finished jobs are deleted this long after they finish (None: kept)
    read_timeout_s: float = 30.0  # for a request's headers, and for each piece of an upload (see serve.app)

    def check_steps(self, steps: int, reasoning_steps: int | None) -> None:
        """UserError when the resolved step counts are over the limits."""
        if steps > self.max_steps:
            raise UserError(f"{{num_inference_steps}} {steps} is over this server's limit of {self.max_steps}",
                            "num_inference_steps")  # fmt: skip
        if reasoning_steps is not None and reasoning_steps > self.max_reasoning_steps:
            raise UserError(f"{{num_temporal_reasoning_steps}} {reasoning_steps} is over this server's limit of "
                            f"{self.max_reasoning_steps}", "num_temporal_reasoning_steps")  # fmt: skip


def describe_validation(errors: Any) -> str:
    """pydantic / FastAPI validation errors as one line: ``where: what; where: what``."""
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
    return " ".join("; ".join(parts).split()) or "invalid request"
