"""Run resolved edits: load the pipeline a :class:`ModelSpec` names, enhance a prompt, generate, write the results.

Nothing here parses or prints: a :class:`Report` carries what a person should see (stage lines, notes, each file
written) to the front end, which shows it its own way.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import files, media
from ..devices import torch_dtype
from .resolve import wants_trajectory
from .settings import DEMO, MODEL_PATH_ENV, VIDEO_FPS, Edit, ModelSpec, OutputPlan

if TYPE_CHECKING:
    from ..pipeline import ChronoEditPipeline
    from ..vlm.base import VLMConfig

DEMO_NOTICE = (
    "the demo model has random weights, so its output is noise; for real edits point --model-path "
    f"(or {MODEL_PATH_ENV}) at a ChronoEdit diffusers checkpoint folder, e.g. a saved nvidia/ChronoEdit-14B-Diffusers"
)
OnStep = Callable[[int, int], None]


def _silent(_message: str) -> None:
    """Say nothing."""


@dataclass(frozen=True)
class Report:
    """Where the application layer's messages go: ``stage`` (what it is doing now), ``note`` (something the user
    should know), ``wrote`` (one line per file written); ``progress_bar`` draws the pipeline's step bar."""

    stage: Callable[[str], None] = _silent
    note: Callable[[str], None] = _silent
    wrote: Callable[[str], None] = _silent
    progress_bar: bool = False


QUIET = Report()
DECODE_STAGE = "decoding the frames with the VAE"  # the stage line after the last step (servers show it as a state)


# ------------------------------------------------------------------------------------------------------------ loading
def checkpoint_path(spec: ModelSpec, report: Report = QUIET) -> str:
    """The checkpoint to load: for the demo model the tiny random-weight checkpoint, made on first use."""
    if spec.model_path != DEMO:
        return spec.model_path
    from ..demo import ensure_demo_checkpoint

    report.note(DEMO_NOTICE)
    return str(ensure_demo_checkpoint())


def load_pipeline(spec: ModelSpec, report: Report = QUIET) -> ChronoEditPipeline:
    """The pipeline ``spec`` names, with its LoRAs attached (each at its own scale), on its device or offloaded."""
    from ..pipeline import ChronoEditPipeline

    path = checkpoint_path(spec, report)
    if spec.device == "cpu" and not spec.is_demo:
        report.stage("note: a real checkpoint on the CPU takes hours per edit and ~70 GB of RAM in fp32 (use a GPU)")
    report.stage(f"loading model from {path} ({spec.dtype}, {spec.device})")
    _quiet_libraries()
    dtype = torch_dtype(spec.dtype)
    low_memory = _low_memory(spec, path, report)
    pipe = ChronoEditPipeline.from_pretrained(path, torch_dtype=dtype, low_memory=low_memory,
                                              **_stored_components(spec, path, report, low_memory))  # fmt: skip
    names = []
    for lora in spec.loras:
        report.stage(f"loading LoRA {lora.path} (scale {lora.scale:g})")
        names.append(pipe.load_lora_weights(str(lora.path), scale=lora.scale, strict=spec.lora_strict))
    if names:
        pipe.set_adapters(names, [lora.scale for lora in spec.loras])
    if spec.attention != "sdpa":
        from ..speed.attention import dispatcher_backend

        pipe.transformer.set_attention_backend(dispatcher_backend(spec.attention))
    if spec.offload_blocks:
        pipe.enable_group_offload(spec.device, num_blocks_per_group=spec.offload_blocks, compute_dtype=dtype)
    elif spec.offload_model:
        pipe.enable_model_cpu_offload(device=spec.device)
    else:
        pipe.to(spec.device)
    if spec.layout is not None:  # the process group runs (see parallel.ranks_of)
        report.stage(spec.layout.describe())
        layout = spec.layout
        pipe.enable_parallelism(layout.ulysses, layout.ring, cfg_parallel=layout.cfg > 1)
    if spec.compile:
        from ..speed.compile import compile_blocks

        report.stage("compiling the transformer blocks (torch.compile, on the first step)")
        compile_blocks(pipe.transformer)
    pipe.set_progress_bar_config(disable=not report.progress_bar)
    return pipe


def _low_memory(spec: ModelSpec, path: str, report: Report) -> bool:
    """``spec.low_memory`` if set, else whether all components at once would not fit in the memory available now."""
    if spec.low_memory is not None:
        return spec.low_memory
    from ..loading import component_bytes
    from ..memory import available_host_bytes, memory_is_short

    sizes = component_bytes(path, torch_dtype(spec.dtype), mapped_transformer=bool(spec.offload_blocks))
    available = available_host_bytes()
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)  # torchrun's processes on this machine each load a copy
    if available is not None and sharing > 1:
        available //= sharing
    if not memory_is_short(sum(sizes.values()), available):
        return False
    report.note(f"the components take {sum(sizes.values()) / 2**30:.1f} GiB and {available / 2**30:.1f} GiB of memory "
                "is available: loading UMT5, CLIP and the VAE only while their stage runs (--low-memory)")
    return True


def _stored_components(spec: ModelSpec, path: str, report: Report, low_memory: bool = False) -> dict[str, Any]:
    """The components loaded here rather than by the pipeline: ``spec``'s transformer file, and with block streaming
    the transformer and UMT5 kept in their stored dtype, memory-mapped (cast block by block while they run); in
    low-memory mode the transformer's tensors that need no cast are views of the mapped files."""
    from ..loading import load_text_encoder_mapped, load_transformer

    streamed = bool(spec.offload_blocks)
    components: dict[str, Any] = {}
    if spec.transformer is not None or streamed or low_memory:
        source, subfolder = (spec.transformer, None) if spec.transformer is not None else (path, "transformer")
        report.stage(f"loading transformer from {source}" + (" (kept as stored, streamed)" if streamed else ""))
        components["transformer"] = load_transformer(source, subfolder=subfolder, torch_dtype=torch_dtype(spec.dtype),
                                                     keep_stored_dtype=streamed,
                                                     mmap=streamed or low_memory)  # fmt: skip
    if streamed:
        components["text_encoder"] = load_text_encoder_mapped(path)
    return components


def _quiet_libraries() -> None:
    """No weight-loading bars from transformers / diffusers (a stage line says what loads)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging_module in (diffusers_logging, transformers_logging):
        logging_module.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------------- enhancing
def enhance(edit: Edit, config: VLMConfig, report: Report = QUIET, device: str | None = None) -> Edit:
    """The edit with its instruction rewritten by the prompt enhancer (a VLM, loaded, used and released here) into
    ChronoEdit's dense form, inside its preset's trigger text. A local VLM runs on ``device`` unless its config says."""
    from ..enhance import enhance_prompt
    from ..presets import get_preset
    from ..vlm import load_vlm

    if config.device is None and config.base_url is None:
        config.device = device
    report.stage(f"enhancing the prompt with {config.where()}")
    with load_vlm(config) as vlm:
        enhanced = enhance_prompt(vlm, edit.image, edit.instruction)
    prompt = get_preset(edit.preset).prompt(enhanced) if edit.preset else enhanced
    return edit.replace(instruction=enhanced, prompt=prompt)


# --------------------------------------------------------------------------------------------------------- generating
def generate(pipe: Any, edit: Edit, return_trajectory: bool = False, on_step: OnStep | None = None,
             report: Report = QUIET) -> Any:  # fmt: skip
    """Run the edit on a loaded pipeline (at the edit's flow shift); its frames (and trajectory) are checked to be
    finite. ``on_step(done, total)`` is called after every denoising step."""
    import torch

    pipe.set_flow_shift(edit.flow_shift)
    def callback(_pipe: Any, step: int, _t: Any, _tensors: dict[str, Any]) -> dict[str, Any]:
        if on_step is not None:
            on_step(step + 1, edit.num_inference_steps)
        if step + 1 == edit.num_inference_steps:  # the VAE decode that follows takes a while on large edits
            report.stage(DECODE_STAGE)
        return {}

    reasoning = f", temporal reasoning for {edit.num_temporal_reasoning_steps} steps" \
        if edit.enable_temporal_reasoning else ""  # fmt: skip
    reasoning += f", step cache {edit.cache}" if edit.cache else ""
    report.stage(f"editing {edit.input_name} at {edit.width}x{edit.height}: {edit.num_inference_steps} steps, "
                 f"{edit.num_frames} frames{reasoning}")  # fmt: skip
    out = pipe(
        image=edit.image, prompt=edit.prompt, negative_prompt=edit.negative_prompt, height=edit.height,
        width=edit.width, num_frames=edit.num_frames, num_inference_steps=edit.num_inference_steps,
        guidance_scale=edit.guidance_scale, generator=torch.Generator(device="cpu").manual_seed(edit.seed),
        output_type="np", enable_temporal_reasoning=edit.enable_temporal_reasoning,
        num_temporal_reasoning_steps=edit.num_temporal_reasoning_steps, return_trajectory=return_trajectory,
        callback_on_step_end=callback, **speed_options(edit),
    )  # fmt: skip
    media.check_finite(out.frames)
    if getattr(out, "trajectory", None) is not None:
        media.check_finite(out.trajectory, "trajectory")
    return out


def speed_options(edit: Edit) -> dict[str, Any]:
    """The pipeline's speed arguments for the edit, only those away from their defaults (so a pipeline without
    them, such as a test's stand-in, runs default edits)."""
    options: dict[str, Any] = {}
    if edit.cache is not None:
        options["cache"] = edit.cache
    if not edit.cfg_batch:
        options["cfg_batch"] = False
    return options


# ------------------------------------------------------------------------------------------------------------ writing
def write_outputs(edit: Edit, plan: OutputPlan, out: Any, report: Report = QUIET) -> list[str]:
    """Write every file of the plan atomically; returns one ``wrote ...`` line per file (each also reported)."""
    frames = out.frames[0]
    trajectory = out.trajectory[0] if getattr(out, "trajectory", None) is not None else None
    edited = media.frames_to_pil(frames[-1:])[0]
    if (plan.trajectory or plan.trajectory_sheet) and trajectory is None:
        raise RuntimeError("the pipeline returned no trajectory; nothing was written")
    lines: list[str] = []

    def write(path: Path, what: str, save: Callable[[], object], detail: str = "") -> None:
        with files.writing(path):
            save()
        lines.append(f"wrote {what}: {path}" + (f" ({detail})" if detail else ""))
        report.wrote(lines[-1])

    image_size = f"{edited.width}x{edited.height}"
    if edit.enhance_prompt and plan.prompt_text is not None:
        write(plan.prompt_text, "enhanced prompt", lambda: files.save_text(edit.instruction + "\n", plan.prompt_text))
    if plan.output is not None and media.output_kind(plan.output) == "image":
        write(plan.output, "edited image", lambda: media.save_image(edited, plan.output), image_size)
    elif plan.output is not None:
        as_trajectory = trajectory is not None and plan.trajectory is None
        video = trajectory if as_trajectory else frames
        write(plan.output, "trajectory video" if as_trajectory else "video",
              lambda: media.save_video(video, plan.output, fps=VIDEO_FPS), f"{len(video)} frames")  # fmt: skip
    if plan.output_image is not None:
        write(plan.output_image, "edited image", lambda: media.save_image(edited, plan.output_image), image_size)
    if plan.trajectory is not None:
        write(plan.trajectory, "trajectory video", lambda: media.save_video(trajectory, plan.trajectory, fps=VIDEO_FPS),
              f"{len(trajectory)} frames")  # fmt: skip
    if plan.trajectory_sheet is not None:
        write(plan.trajectory_sheet, "trajectory contact sheet",
              lambda: media.save_contact_sheet(trajectory, plan.trajectory_sheet), f"{len(trajectory)} frames")
    return lines


def run_edit(spec: ModelSpec, edit: Edit, plan: OutputPlan, report: Report = QUIET) -> list[str]:
    """Load the model with the edit's LoRAs (its preset's too), run the edit, write the outputs; the ``wrote ...``
    lines. With a context-parallel layout every rank of the launch runs it and rank 0 reports and writes."""
    from .parallel import ranks_of

    with ranks_of(spec) as ranks:
        report = report if ranks.is_main else QUIET  # the other ranks run the same stages silently
        pipe = load_pipeline(dataclasses.replace(spec, loras=edit.loras), report)
        out = generate(pipe, edit, wants_trajectory(edit, plan), report=report)
        return write_outputs(edit, plan, out, report) if ranks.is_main else []
