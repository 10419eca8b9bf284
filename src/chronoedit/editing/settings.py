"""What an edit is made of, as the front ends give it: the model to load (:class:`ModelSpec`), one edit's settings
(:class:`EditSettings`) and where its results go (:class:`OutputPlan`); and the fully resolved edit (:class:`Edit`).

Field names are the words of the settings (and of the pipeline's call, the manifest columns and the API options):
errors name them, and each front end words them its own way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import UserError
from ..parallel.layout import Layout

DEMO = "demo"
DEMO_PROMPT = "put a red hat on the cup"
DEMO_MAX_AREA = 256 * 256
DEMO_STEPS = 4
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0
DEFAULT_FLOW_SHIFT = 5.0
DEFAULT_SEED = 0
VIDEO_FPS = 8
MODEL_PATH_ENV = "CHRONOEDIT_MODEL_PATH"
PRESET_SAMPLING = ("num_inference_steps", "guidance_scale", "flow_shift", "max_area")  # what a preset may set


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and the scale it is applied at."""

    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how: the checkpoint (a folder, a hub id or ``demo``), an optional transformer file or folder
    in its place (safetensors, fp8 or GGUF: the quantization is the file's), device, dtype, offloading, the attention
    backend and the LoRAs loaded with the model. Built by :func:`chronoedit.editing.resolve_model`, which checks all
    of it."""

    model_path: str = DEMO
    transformer: Path | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    offload_model: bool = False
    offload_blocks: int = 0  # block streaming, this many blocks at a time (0: off); weights kept as stored
    loras: tuple[LoraSpec, ...] = ()
    lora_strict: bool = True
    lora_scale: float = 1.0  # the scale of a preset's LoRAs taken from the checkpoint's lora/ folder
    attention: str = "sdpa"  # attention backend (chronoedit.speed.attention): sdpa, flash, sage, ...
    compile: bool = False  # torch.compile each transformer block (chronoedit.speed.compile)
    low_memory: bool | None = None  # each of UMT5, CLIP, VAE loaded for its stage only (None: when memory is short)
    layout: Layout | None = None  # context parallel: one edit over the ranks of a torchrun launch (None: one device)

    @property
    def is_demo(self) -> bool:
        return self.model_path == DEMO

    @property
    def local_folder(self) -> Path | None:
        """The checkpoint folder on this machine (None for the demo model and hub ids)."""
        path = Path(self.model_path).expanduser()
        return path if not self.is_demo and path.is_dir() else None


@dataclass(frozen=True)
class EditSettings:
    """One edit as asked: every value left None takes its default (a preset's first, then the model's)."""

    prompt: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None
    height: int | None = None
    width: int | None = None
    max_area: int | None = None
    num_frames: int | None = None
    seed: int | None = None
    enable_temporal_reasoning: bool = False
    num_temporal_reasoning_steps: int | None = None
    preset: str | None = None
    enhance_prompt: bool = False
    cache: str | None = None  # a step cache, NAME[:VALUE] (chronoedit.speed.caches); "none" for none
    cfg_batch: bool | None = None  # both CFG branches in one forward (default on)

    def overlay(self, changes: dict[str, Any]) -> EditSettings:
        """These settings (a batch's flags, a server's defaults) with one edit's own values on top.

        The edit's values win; a preset it names also replaces the defaults' sampling values it does not set itself;
        turning reasoning off drops the defaults' reasoning values; its size replaces the defaults' as a pair, and an
        area of its own drops the defaults' fixed size.
        """
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"not edit settings: {', '.join(unknown)}")  # a bug in the front end, not user input
        if ("height" in changes) != ("width" in changes):
            raise UserError("{height} and {width} must be given together", "height", ("width",))
        reset: dict[str, Any] = {}
        if changes.get("preset") is not None:
            reset |= dict.fromkeys(PRESET_SAMPLING)
        if changes.get("enable_temporal_reasoning") is False:
            reset |= {"num_temporal_reasoning_steps": None, "num_frames": None}
        if "max_area" in changes and "height" not in changes:
            reset |= {"height": None, "width": None}
        return dataclasses.replace(self, **(reset | changes))


@dataclass(frozen=True)
class OutputPlan:
    """Where one edit's results go. ``output`` is an image, or an ``.mp4`` (the trajectory when reasoning runs and no
    ``trajectory`` is given, else the edit's frames); ``prompt_text`` receives the enhanced prompt, when there is one
    (default: ``<output stem>.prompt.txt``)."""

    output: Path | None = None
    output_image: Path | None = None
    trajectory: Path | None = None
    trajectory_sheet: Path | None = None
    prompt_text: Path | None = None

    def paths(self) -> dict[str, Path]:
        """The given paths by field name."""
        return {f.name: value for f in dataclasses.fields(self) if (value := getattr(self, f.name)) is not None}


@dataclass(frozen=True)
class Edit:
    """One edit, resolved and checked: every value final, the image read and resized to ``width`` x ``height``,
    ``prompt`` as the model sees it (inside a preset's trigger text), ``loras`` every LoRA active for it."""

    image: Image.Image = field(repr=False)
    input_name: str
    instruction: str  # the user's words, before a preset's trigger text or the enhancer
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    seed: int
    enable_temporal_reasoning: bool
    num_temporal_reasoning_steps: int
    preset: str | None
    enhance_prompt: bool
    loras: tuple[LoraSpec, ...] = ()
    cache: str | None = None  # normalised NAME:VALUE, None for no cache
    cfg_batch: bool = True

    def replace(self, **changes: Any) -> Edit:
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict[str, Any]:
        """The exact values the edit runs with (recorded beside results)."""
        names = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "flow_shift", "width",
                 "height", "num_frames", "enable_temporal_reasoning", "num_temporal_reasoning_steps", "preset")
        values = {name: getattr(self, name) for name in names}  # fmt: skip
        return values | ({"cache": self.cache} if self.cache is not None else {})  # changes the output when set
