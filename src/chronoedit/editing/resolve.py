"""Resolve and check, once, what the front ends give: the model to load, one edit's settings and its outputs.

Everything that can be checked without the model is checked here, before anything loads: files exist and can be
read, values are in range and agree with each other, outputs can be written. A preset is applied here and nowhere
else. Every error is a :class:`~chronoedit.errors.UserError` naming its field.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .. import files, media, rules, sizing
from ..devices import DTYPE_NAMES, default_dtype, resolve_device
from ..errors import UserError
from ..loading import looks_like_repo_id
from ..lora import check_scale
from ..parallel.layout import check_guidance
from ..presets import Preset, find_preset_loras, get_preset
from ..speed.attention import check_attention
from ..speed.caches import parse_cache
from ..speed.compile import check_compile
from .parallel import rank_device, resolve_layout
from .settings import (
    DEFAULT_FLOW_SHIFT,
    DEFAULT_GUIDANCE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEMO,
    DEMO_MAX_AREA,
    DEMO_PROMPT,
    DEMO_STEPS,
    MODEL_PATH_ENV,
    Edit,
    EditSettings,
    LoraSpec,
    ModelSpec,
    OutputPlan,
)

TRANSFORMER_SUFFIXES = (".safetensors", ".gguf")


# -------------------------------------------------------------------------------------------------------------- model
def resolve_model(
    model_path: str | None = None,
    transformer: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    offload_model: bool = False,
    loras: Sequence[LoraSpec] = (),
    lora_strict: bool = True,
    lora_scale: float = 1.0,
    offload_blocks: int = 0,
    attention: str | None = None,
    compile: bool = False,
    context_parallel: bool | None = False,
    ulysses_degree: int | None = None,
    ring_degree: int | None = None,
    cfg_parallel: bool = False,
    low_memory: bool | None = None,
) -> ModelSpec:
    """The model to load, checked: the checkpoint (``model_path``, else ``$CHRONOEDIT_MODEL_PATH``, else the demo
    model), the transformer file, the device (default cuda when available), the dtype (bf16 on GPU, fp32 on the CPU
    and for the demo), the attention backend (its package and device), compiling (its compiler) and the LoRA files.
    Offloading is dropped on the CPU, where it does nothing. Context parallel (``context_parallel``: None for
    "whenever launched on several ranks") gets its layout (:func:`~.parallel.resolve_layout`) and this rank's
    device. ``low_memory``: True, False, or None to decide at load from the memory available."""
    path = model_path or os.environ.get(MODEL_PATH_ENV) or DEMO
    if path != DEMO and not Path(path).expanduser().exists() and not looks_like_repo_id(path):
        raise UserError(f"model folder not found: {path} (point {{model_path}} or {MODEL_PATH_ENV} at a ChronoEdit "
                        "diffusers checkpoint folder, or use {model_path} demo)", "model_path")  # fmt: skip
    transformer = _check_transformer(transformer)
    layout = resolve_layout(path, transformer, context_parallel, ulysses_degree, ring_degree, cfg_parallel)
    device = rank_device(resolve_device(device), layout)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UserError(f"{{dtype}} must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}", "dtype")
    return ModelSpec(
        model_path=path,
        transformer=transformer,
        device=device,
        dtype=dtype or default_dtype(device, demo=path == DEMO),
        offload_model=offload_model and device != "cpu",
        offload_blocks=_check_offload_blocks(offload_blocks, offload_model),
        loras=tuple(check_lora(lora) for lora in loras),
        lora_strict=lora_strict,
        lora_scale=check_lora_scale(lora_scale, "LoRAs given without a scale"),
        attention=check_attention(attention, device),
        compile=_check_compile(compile, device),
        layout=layout,
        low_memory=low_memory,
    )


MAX_BLOCKS_PER_GROUP = 64


def parse_offload(text: str) -> tuple[bool, int]:
    """``model`` -> (True, 0); ``blocks`` / ``blocks:K`` -> (False, K) (K blocks at a time, 1 by default)."""
    mode, _, count = text.strip().partition(":")
    if mode == "model" and not count:
        return True, 0
    if mode == "blocks" and (not count or count.isdigit()):
        blocks = int(count or 1)
        if blocks < 1:
            raise UserError(f"{{offload}} blocks:K needs K from 1 to {MAX_BLOCKS_PER_GROUP}, got {blocks}", "offload")
        return False, blocks
    raise UserError(f"{{offload}} must be model, blocks or blocks:K (K blocks at a time), got {text!r}", "offload")


def _check_offload_blocks(blocks: int, offload_model: bool) -> int:
    """Block streaming's group size: 0 (off) to :data:`MAX_BLOCKS_PER_GROUP`, not with model offload."""
    if not isinstance(blocks, int) or isinstance(blocks, bool) or not 0 <= blocks <= MAX_BLOCKS_PER_GROUP:
        raise UserError(f"{{offload}} blocks:K needs K from 1 to {MAX_BLOCKS_PER_GROUP}, got {blocks!r}", "offload")
    if blocks and offload_model:
        raise UserError("{offload} blocks and model offload are two ways of doing one thing: choose one", "offload")
    return blocks


def _check_compile(compile: bool, device: str) -> bool:
    """``--compile``: its compiler there when on."""
    if compile:
        check_compile(device)
    return bool(compile)


def _check_transformer(path: str | Path | None) -> Path | None:
    """A transformer to use instead of the checkpoint's: an existing .safetensors or .gguf file, or a folder."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise UserError(f"{{transformer}} not found: {path}", "transformer")
    if path.is_file() and path.suffix not in TRANSFORMER_SUFFIXES:
        raise UserError(f"{{transformer}} must be a .safetensors or .gguf file or a transformer folder, got {path}",
                        "transformer")  # fmt: skip
    return path


def check_lora(lora: LoraSpec) -> LoraSpec:
    """A LoRA file that exists, at a finite scale of reasonable size."""
    if not lora.path.exists():
        raise UserError(f"LoRA file not found: {lora.path}", "lora_path")
    check_lora_scale(lora.scale, f"LoRA {lora.path}")
    return lora


def check_lora_scale(scale: float, what: str) -> float:
    """A LoRA scale: finite and within +-:data:`chronoedit.lora.MAX_SCALE` (the rule lives there, where the Python
    API applies it too); the error names ``what`` and the field ``lora_scale``."""
    return check_scale(scale, what, "lora_scale")


def parse_lora(text: str, default_scale: float) -> LoraSpec:
    """``file.safetensors:0.8`` -> that file at 0.8; without a numeric suffix the default scale."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return LoraSpec(Path(path), float(scale))
        except ValueError:
            pass
    return LoraSpec(Path(text), default_scale)


# --------------------------------------------------------------------------------------------------------------- edit
@dataclass(frozen=True)
class Sampling:
    """An edit's values that need neither its prompt nor its image, final and checked."""

    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    seed: int
    num_frames: int
    num_temporal_reasoning_steps: int
    size: tuple[int, int] | None  # (width, height) when fixed, else automatic at max_area
    max_area: int
    loras: tuple[LoraSpec, ...]
    cache: str | None = None
    cfg_batch: bool = True


def resolve_sampling(settings: EditSettings, model: ModelSpec) -> Sampling:
    """Every value of ``settings`` that needs neither prompt nor image, with its preset's and the model's defaults,
    checked (a batch's and a server's own flags are checked this way before any row or request)."""
    preset = get_preset(settings.preset) if settings.preset else None
    demo = model.is_demo
    steps = rules.check_steps(_pick(settings.num_inference_steps, preset, "num_inference_steps",
                                    DEMO_STEPS if demo else DEFAULT_STEPS))  # fmt: skip
    guidance = rules.check_guidance(_pick(settings.guidance_scale, preset, "guidance_scale", DEFAULT_GUIDANCE))
    flow_shift = rules.check_flow_shift(_pick(settings.flow_shift, preset, "flow_shift", DEFAULT_FLOW_SHIFT))
    seed = rules.check_seed(DEFAULT_SEED if settings.seed is None else settings.seed)
    num_frames, reasoning_steps = rules.resolve_frames(settings.enable_temporal_reasoning, settings.num_frames, steps,
                                                       settings.num_temporal_reasoning_steps)  # fmt: skip
    size = None
    if settings.height is not None or settings.width is not None:
        size = rules.check_size(settings.width, settings.height)
    max_area = rules.check_max_area(_pick(settings.max_area, preset, "max_area",
                                          DEMO_MAX_AREA if demo else sizing.DEFAULT_MAX_AREA))  # fmt: skip
    return Sampling(num_inference_steps=steps, guidance_scale=guidance, flow_shift=flow_shift, seed=seed,
                    num_frames=num_frames, num_temporal_reasoning_steps=reasoning_steps, size=size,
                    max_area=max_area, loras=_edit_loras(model, preset), cache=check_cache(settings.cache),
                    cfg_batch=check_cfg_batch(settings.cfg_batch))  # fmt: skip


def check_cache(cache: object) -> str | None:
    """A step cache name, ``NAME[:VALUE]``, normalised (``first-block`` -> ``first-block:0.05``); None for none."""
    spec = parse_cache(cache)
    return None if spec is None else str(spec)


def check_cfg_batch(cfg_batch: object) -> bool:
    """Whether both CFG branches run in one forward (default: yes)."""
    if cfg_batch is None:
        return True
    if not isinstance(cfg_batch, bool):
        raise UserError(f"{{cfg_batch}} must be true or false, got {cfg_batch!r}", "cfg_batch")
    return cfg_batch


def resolve_edit(settings: EditSettings, model: ModelSpec, image: str | Path | Image.Image | None = None) -> Edit:
    """One edit, every value final and checked, its image read and resized. ``image`` is a path, a decoded image, or
    None for the shipped example image."""
    instruction = settings.prompt if settings.prompt is not None else (DEMO_PROMPT if model.is_demo else None)
    if instruction is None or not instruction.strip():
        raise UserError("{prompt} is required (it may only be left out with {model_path} demo)", "prompt",
                        ("model_path",))  # fmt: skip
    values = resolve_sampling(settings, model)
    check_guidance(model.layout, values.guidance_scale)
    input_name, picture = read_input(image)
    width, height = values.size or sizing.auto_size(*picture.size, max_area=values.max_area)
    preset = get_preset(settings.preset) if settings.preset else None
    return Edit(
        image=sizing.resize_for_edit(picture, width, height), input_name=input_name, instruction=instruction,
        prompt=preset.prompt(instruction) if preset else instruction, negative_prompt=settings.negative_prompt,
        width=width, height=height, num_frames=values.num_frames, num_inference_steps=values.num_inference_steps,
        guidance_scale=values.guidance_scale, flow_shift=values.flow_shift, seed=values.seed,
        enable_temporal_reasoning=settings.enable_temporal_reasoning,
        num_temporal_reasoning_steps=values.num_temporal_reasoning_steps, preset=settings.preset,
        enhance_prompt=settings.enhance_prompt, loras=values.loras, cache=values.cache, cfg_batch=values.cfg_batch,
    )  # fmt: skip


def _pick(value: object, preset: Preset | None, name: str, default: object) -> object:
    """The edit's own value, else its preset's, else the default."""
    if value is not None:
        return value
    preset_value = getattr(preset, name, None) if preset is not None else None
    return preset_value if preset_value is not None else default


def _edit_loras(model: ModelSpec, preset: Preset | None) -> tuple[LoraSpec, ...]:
    """The model's LoRAs plus the ones its preset needs that are not among them, from the checkpoint's ``lora/``
    folder, at the model's ``lora_scale``."""
    if preset is None:
        return model.loras
    extra = find_preset_loras(preset, [lora.path for lora in model.loras], model.local_folder)
    return model.loras + tuple(LoraSpec(path, model.lora_scale) for path in extra)


def read_input(image: str | Path | Image.Image | None) -> tuple[str, Image.Image]:
    """(name, RGB image): a path read in full, a decoded image, or the shipped example image when None (drawn on the
    fly when the asset is missing)."""
    if isinstance(image, Image.Image):
        return "image", media.to_rgb(image)
    if image is not None:
        return str(image), media.load_image(image)
    from importlib import resources

    example = resources.files("chronoedit").joinpath("assets/example.png")
    if example.is_file():
        with resources.as_file(example) as example_path:
            return "example image", media.load_image(example_path)
    from ..demo import draw_example_image

    return "example image (drawn)", draw_example_image()


# ------------------------------------------------------------------------------------------------------------ outputs
_KINDS = {"output_image": "image", "trajectory": "video", "trajectory_sheet": "image"}
_TRAJECTORY = ("trajectory", "trajectory_sheet")


def resolve_outputs(plan: OutputPlan, edit: Edit) -> OutputPlan:
    """The plan checked against the edit: each file's kind fits its role, no two roles write one file, trajectories
    need reasoning steps, and every folder accepts files (created if needed: the last check). The enhanced prompt goes
    beside the first output unless the plan says where."""
    for role in _TRAJECTORY:
        if getattr(plan, role) is not None and not has_trajectory(edit):
            raise UserError(f"{{{role}}} needs {{enable_temporal_reasoning}} with at least 1 reasoning step", role,
                            ("enable_temporal_reasoning",))  # fmt: skip
    if edit.enhance_prompt and plan.prompt_text is None:
        target = plan.output or plan.output_image
        if target is not None:
            plan = OutputPlan(**(plan.paths() | {"prompt_text": target.with_name(f"{target.stem}.prompt.txt")}))
    seen: dict[str, str] = {}
    for role, path in plan.paths().items():
        kind = "text" if role == "prompt_text" else media.output_kind(path)
        if role in _KINDS and kind != _KINDS[role]:
            raise UserError(f"{{{role}}} {path} must be {'a .mp4 video' if kind == 'image' else 'an image'}", role)
        key = os.path.abspath(path)
        if key in seen:
            raise UserError(f"{{{role}}} and {{{seen[key]}}} both write {path}", role, (seen[key],))
        seen[key] = role
    for path in plan.paths().values():
        files.check_writable(path)
    return plan


def has_trajectory(edit: Edit) -> bool:
    """Whether the edit reasons in time for at least one step (so it has a trajectory to show)."""
    return edit.enable_temporal_reasoning and edit.num_temporal_reasoning_steps >= 1


def wants_trajectory(edit: Edit, plan: OutputPlan) -> bool:
    """Whether to ask the pipeline for the trajectory: the edit has one and the plan writes it somewhere."""
    video = plan.output is not None and media.output_kind(plan.output) == "video"
    return has_trajectory(edit) and (video or plan.trajectory is not None or plan.trajectory_sheet is not None)
