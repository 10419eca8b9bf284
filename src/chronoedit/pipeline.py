"""The ChronoEdit editing pipeline: an edit is a short image-to-video generation from the input to the edit.

``__call__`` reads as the algorithm: check inputs -> encode text -> encode image -> prepare latents and condition ->
denoise (dropping the reasoning frames at their step) -> decode -> postprocess.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from . import reasoning
from .encoders import TEXT_TOKENS, encode_image, encode_text
from .errors import UserError
from .latents import decode_latents, encode_condition, first_frame_mask, image_to_tensor, latent_frames, postprocess
from .memory import CPU, make_room, module_bytes, resident
from .model import ChronoEditTransformer3DModel
from .request import EditRequest, check_inputs
from .speed.caches import cache_config
from .speed.guidance import Conditioning, FlowPredictor


@dataclass
class ChronoEditPipelineOutput:
    """``frames``: the generated video(s), shaped like the reference's (np (B, F, H, W, 3), pt (B, F, 3, H, W),
    pil [[Image] * F] * B, or latents); the edited image is the last frame. ``trajectory``: with
    ``return_trajectory=True``, the reasoning video from the input to the edit, in the same format. With
    ``output_type="latent"`` and an early drop it is the clean-latent prediction of all frames at the last reasoning
    step (decode it with the final edit's frames after its first to get the pixel trajectory)."""

    frames: Any
    trajectory: Any | None = None

    def __getitem__(self, index: int) -> Any:
        return (self.frames, self.trajectory)[index]


@dataclass
class DenoiseResult:
    latents: torch.Tensor  # [B, 16, F_lat, h, w], the final latents (2 frames when the reasoning frames dropped)
    trajectory_latents: torch.Tensor | None  # [B, 16, 8, h, w] clean prediction at the last reasoning step


class ChronoEditPipeline:
    """Image editing with ChronoEdit. Same call arguments as diffusers' ``ChronoEditPipeline``."""

    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds")

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: torch.nn.Module,
        image_encoder: torch.nn.Module,
        image_processor: Any,
        transformer: ChronoEditTransformer3DModel,
        vae: torch.nn.Module,
        scheduler: Any,
    ) -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.image_encoder, self.image_processor = image_encoder, image_processor
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.device = CPU
        self.offload_models = False  # transformer and VAE leave the device when idle (--offload_model)
        self.offload_encoders = True  # UMT5 and CLIP never stay on the device while denoising
        self._progress: dict[str, Any] = {}
        self._interrupt = False
        self.reuse_context_kv = True  # cross-attention keys/values of the text and CLIP tokens once per edit (exact)
        self.transformer_calls = 0  # transformer forwards of the last call
        self.parallel: Any = None  # a chronoedit.parallel.ContextParallel: this edit runs on several ranks

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, torch_dtype: torch.dtype = torch.float32, low_memory: bool = False,
                        **components: Any):  # fmt: skip
        """Load a diffusers-layout ChronoEdit folder (or hub repo id); always builds *our* transformer.

        ``components`` (transformer=, vae=, text_encoder=, ...) replace what would be loaded from the folder.
        ``low_memory``: UMT5, CLIP and the VAE (those not given) are each built when their stage starts and dropped
        when it ends (:mod:`chronoedit.lazy`), so the peak memory is the largest stage's, not the sum.
        """
        from .loading import LAZY_COMPONENTS, lazy_components, load_pipeline_components

        if low_memory:
            lazy = [name for name in LAZY_COMPONENTS if components.get(name) is None]
            components.update(lazy_components(path_or_repo_id, torch_dtype, lazy))
        return cls(**load_pipeline_components(path_or_repo_id, torch_dtype, **components))

    # ----- placement -------------------------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> ChronoEditPipeline:
        """Run on ``device``. Components move there when first used: the encoders visit to encode and leave, so on
        the first call they never share the device with the transformer; the transformer and VAE then stay."""
        self.device = torch.device(device)
        return self

    def enable_model_cpu_offload(self, device: str | torch.device = "cuda") -> ChronoEditPipeline:
        """Keep every component on the CPU and move each to ``device`` only while it works."""
        self.offload_models = True
        self.device = torch.device(device)
        for module in (self.transformer, self.vae, self.text_encoder, self.image_encoder):
            if isinstance(module, torch.nn.Module):  # not a low-memory stand-in (chronoedit.lazy)
                module.to(CPU)
        return self

    def enable_group_offload(
        self,
        onload_device: str | torch.device = "cuda",
        num_blocks_per_group: int = 1,
        use_stream: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> ChronoEditPipeline:
        """Block streaming (diffusers' name): the transformer's and UMT5's blocks stay where and as they are stored
        (e.g. bf16, memory-mapped) and come to ``onload_device`` in ``compute_dtype`` (default: fp32 on the CPU, else
        bf16) ``num_blocks_per_group`` at a time while they run, the next group prefetched on a CUDA side stream
        with ``use_stream``. See :mod:`chronoedit.streaming`."""
        from .streaming import stream_components

        self.device = torch.device(onload_device)
        dtype = compute_dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        stream_components(self.transformer, self.text_encoder, self.device, dtype, num_blocks_per_group, use_stream)
        return self

    def enable_parallelism(
        self, ulysses_degree: int | None = None, ring_degree: int | None = None, cfg_parallel: bool = False
    ) -> Any:
        """Run each edit on all ranks of the running ``torch.distributed`` default process group (context
        parallelism; call on every rank, after ``init_process_group``): with ``cfg_parallel`` the two guidance
        branches on the two halves of the ranks, and each branch's token sequence split over its ranks, Ulysses
        (all-to-all over the heads, ``ulysses_degree`` must divide them) times ring (``ring_degree``). Unset degrees
        are chosen. Every rank returns the same output; only rank 0 shows progress. Returns the
        :class:`~chronoedit.parallel.Layout`. See :mod:`chronoedit.parallel`."""
        import torch.distributed as dist

        from .parallel import ContextParallel, choose_layout

        if not dist.is_initialized():
            raise UserError("enable_parallelism needs torch.distributed initialised first (launch with torchrun)")
        heads = self.transformer.config.num_attention_heads
        layout = choose_layout(dist.get_world_size(), heads, cfg_parallel, ulysses_degree, ring_degree)
        self.parallel = ContextParallel(layout, self.device.type)
        if layout.sequence > 1:
            self.transformer.enable_parallelism(self.parallel)
        else:
            self.transformer.disable_parallelism()
        self.set_progress_bar_config(**self._progress)
        return layout

    def set_flow_shift(self, flow_shift: float) -> None:
        """Rebuild the scheduler with another flow shift (5.0 by default; 2.0 for the 8-step distilled LoRA).
        UniPC / DPM-Solver call it ``flow_shift``, FlowMatchEuler ``shift``."""
        if not math.isfinite(flow_shift) or flow_shift <= 0:
            raise UserError(f"{{flow_shift}} must be a positive finite number, got {flow_shift}", field="flow_shift")
        name = next((k for k in ("flow_shift", "shift") if k in self.scheduler.config), None)
        if name is None:
            raise UserError(f"{type(self.scheduler).__name__} has no flow shift setting", field="flow_shift")
        self.scheduler = type(self.scheduler).from_config(self.scheduler.config, **{name: flow_shift})

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self._progress = kwargs
        if self.parallel is not None and self.parallel.rank != 0:  # only rank 0 shows progress
            self._progress["disable"] = True

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    # ----- LoRA (diffusers' method names; the work is in chronoedit.lora) --------------------------------------
    def load_lora_weights(
        self, path: Any, adapter_name: str | None = None, scale: float = 1.0, strict: bool = True
    ) -> str:
        """Attach a LoRA of any layout (diffusers, Wan/ComfyUI, DiffSynth, musubi) from ``path``: a file, a folder
        holding one ``*.safetensors`` or a state dict; active at ``scale`` together with the others. Returns the
        adapter name (default: the file stem, made unique). ``strict=False`` warns about keys that match no layer
        instead of failing."""
        from .lora import load_lora

        return load_lora(self.transformer, path, adapter_name, scale=scale, strict=strict)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Make exactly these adapters active, each at its weight (default: its current scale)."""
        from .lora import set_adapters

        set_adapters(self.transformer, adapter_names, adapter_weights)

    def disable_lora(self) -> None:
        """Run the base model; the adapters stay loaded."""
        from .lora import disable_lora

        disable_lora(self.transformer)

    def enable_lora(self) -> None:
        """Undo :meth:`disable_lora`."""
        from .lora import enable_lora

        enable_lora(self.transformer)

    def fuse_lora(self, adapter_names: list[str] | None = None) -> None:
        """Merge adapters (default: the active ones, at their scales) into the transformer's weights."""
        from .lora import fuse_lora

        fuse_lora(self.transformer, adapter_names)

    def unfuse_lora(self) -> None:
        """Take fused adapters out of the weights again (they still apply, unfused)."""
        from .lora import unfuse_lora

        unfuse_lora(self.transformer)

    def unload_lora_weights(self) -> None:
        """Remove every LoRA: the transformer is the plain model again, its weights the originals."""
        from .lora import unload_lora

        unload_lora(self.transformer)

    def get_active_adapters(self) -> list[str]:
        """Names of the adapters that shape the output now ([] when none or disabled)."""
        from .lora import active_adapters

        return list(active_adapters(self.transformer))

    # ----- end of LoRA -----------------------------------------------------------------------------------------

    # ----- the algorithm ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | np.ndarray | torch.Tensor,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        max_sequence_length: int = TEXT_TOKENS,
        enable_temporal_reasoning: bool = False,
        num_temporal_reasoning_steps: int | None = None,
        return_trajectory: bool = False,
        cfg_batch: bool = True,
        cache: Any = None,
    ) -> ChronoEditPipelineOutput | tuple[Any, ...]:
        """Edit ``image`` as ``prompt`` says. Sizes default to the 720x1280 area at the image's aspect ratio;
        ``num_frames`` to 5 (29 with temporal reasoning); ``num_temporal_reasoning_steps`` to all steps.

        Speed (see :mod:`chronoedit.speed`): ``cfg_batch`` runs both CFG branches in one forward (same numbers);
        ``cache`` a step cache for this call: a name (``"first-block:0.05"``, ``"taylorseer:5"``) or a diffusers
        cache config (``FirstBlockCacheConfig(...)``, ``MagCacheConfig(...)``, ...); each branch keeps its own."""
        req = check_inputs(  # 1. one clear error per bad argument, before any model runs
            self, image=image, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_frames=num_frames, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_videos_per_prompt=num_videos_per_prompt, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
            attention_kwargs=attention_kwargs, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length, enable_temporal_reasoning=enable_temporal_reasoning,
            num_temporal_reasoning_steps=num_temporal_reasoning_steps, return_trajectory=return_trajectory,
        )  # fmt: skip
        config = self.check_speed_options(cfg_batch, cache)
        cond = self.encode_conditioning(req)  # 2. UMT5 text (and negative) embeddings, CLIP image tokens
        latents, condition = self.prepare_latents(req)  # 3. noise; first-frame mask + input image latents
        with self.step_cache(config):  # 4. sampling; reasoning frames dropped at their step
            result = self.denoise(req, cond, latents, condition, cfg_batch)
        frames, trajectory = self.decode(req, result)  # 5. VAE decode and postprocess (or latents as they are)
        output = ChronoEditPipelineOutput(frames=frames, trajectory=trajectory)
        return output if return_dict else (frames,) if trajectory is None else (frames, trajectory)

    def encode_conditioning(self, req: EditRequest) -> Conditioning:
        """Text embeddings (negative only with CFG) and CLIP image tokens, each encoder visiting the device."""
        batch = len(req.prompts) * req.num_videos_per_prompt
        evictable = [self.transformer, self.vae]  # after the first call they may sit on the device
        make_room(self.device, module_bytes(self.text_encoder) + module_bytes(self.image_encoder), evictable)
        offload = self.offload_encoders or self.offload_models
        positive, negative = req.prompt_embeds, req.negative_prompt_embeds
        if positive is None or (req.do_cfg and negative is None):
            with resident(self.text_encoder, self.device, offload) as text_encoder:
                if positive is None:
                    positive = encode_text(self.tokenizer, text_encoder, req.prompts, req.max_sequence_length)
                if req.do_cfg and negative is None:
                    negative = encode_text(self.tokenizer, text_encoder, req.negative_prompts, req.max_sequence_length)
        with resident(self.image_encoder, self.device, offload) as image_encoder:
            image_embeds = encode_image(self.image_processor, image_encoder, [req.image])
        dtype, device = self.transformer.dtype, self.device
        return Conditioning(
            prompt_embeds=expand(positive, req.num_videos_per_prompt).to(device, dtype),
            negative_prompt_embeds=None
            if negative is None
            else expand(negative, req.num_videos_per_prompt).to(device, dtype),
            image_embeds=image_embeds.expand(batch, -1, -1).to(device, dtype),
        )

    def prepare_latents(self, req: EditRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise [B, 16, F_lat, h, w] (float32) and the condition [B, 4 + 16, F_lat, h, w]: first-frame mask and
        the VAE latents of the input followed by black frames."""
        from diffusers.utils.torch_utils import randn_tensor

        batch = len(req.prompts) * req.num_videos_per_prompt
        frames, factor = latent_frames(req.num_frames), self.vae_spatial_factor
        shape = (batch, self.vae.config.z_dim, frames, req.height // factor, req.width // factor)
        if req.latents is None:
            latents = randn_tensor(shape, generator=req.generator, device=self.device, dtype=torch.float32)
        else:
            latents = req.latents.to(self.device, torch.float32)
        if self.parallel is not None:
            latents = self.parallel.broadcast(latents.contiguous())  # the same noise on every rank, seeded or not
        with resident(self.vae, self.device, self.offload_models) as vae:
            image = image_to_tensor(req.image, req.width, req.height)
            image_latents = encode_condition(vae, image, req.num_frames).to(self.device)
        mask = first_frame_mask(batch, frames, *shape[-2:], device=self.device)
        return latents, torch.cat([mask, image_latents.expand(batch, -1, -1, -1, -1)], dim=1)

    def denoise(
        self, req: EditRequest, cond: Conditioning, latents: torch.Tensor, condition: torch.Tensor,
        cfg_batch: bool = True,
    ) -> DenoiseResult:  # fmt: skip
        """The sampling loop; the reasoning frames leave latents, condition and solver history at the drop step (and
        the step caches forget what they kept: the token count changed)."""
        plan = req.reasoning
        self.scheduler.set_timesteps(req.num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        trajectory_latents = None
        self._interrupt = False
        predict = FlowPredictor(self.transformer, req.guidance_scale, cfg_batch, self.reuse_context_kv,
                                req.attention_kwargs, branches=self.parallel)  # fmt: skip
        predict.reset()
        with resident(self.transformer, self.device, self.offload_models), self.progress_bar(len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                if self._interrupt:
                    break
                if i == plan.drop_step:
                    latents, condition = reasoning.drop_reasoning_frames(latents, condition, self.scheduler)
                    predict.reset()
                model_input = torch.cat([latents, condition], dim=1).to(self.transformer.dtype)  # [B, 36, F, h, w]
                flow = predict(model_input, t, i, cond)
                if i == plan.capture_step and req.return_trajectory:
                    trajectory_latents = reasoning.clean_prediction(latents, flow, self.scheduler.sigmas[i])
                latents = self.scheduler.step(flow, t, latents, return_dict=False)[0]
                check_finite(latents, i, len(timesteps), self.transformer.dtype)
                if req.callback is not None:
                    latents, cond = self.run_callback(req, i, t, latents, cond)
                bar.update()
        predict.reset()
        self.transformer_calls = predict.calls
        return DenoiseResult(latents=latents, trajectory_latents=trajectory_latents)

    # ----- speed -----------------------------------------------------------------------------------------------
    def check_speed_options(self, cfg_batch: Any, cache: Any) -> Any:
        """The diffusers cache config ``cache`` names (None for none); UserErrors for bad values."""
        if not isinstance(cfg_batch, bool):
            raise UserError(f"{{cfg_batch}} must be True or False, got {cfg_batch!r}", field="cfg_batch")
        config = cache_config(cache)
        if config is not None and self.parallel is not None and self.parallel.layout.sequence > 1:
            raise UserError("{cache}: step caches do not run with the token sequence split over ranks yet (each rank "
                            "would decide on its own tokens); split the guidance branches instead, or run without",
                            "cache")  # fmt: skip
        if config is not None and getattr(self.transformer, "is_cache_enabled", False):
            raise UserError("{cache}: the transformer already has a step cache (disable_cache() it first)", "cache")
        return config

    @contextmanager
    def step_cache(self, config: Any) -> Iterator[None]:
        """``config`` hooked onto the transformer for the duration (nothing when None)."""
        if config is None:
            yield
            return
        self.transformer.enable_cache(config)
        try:
            yield
        finally:
            self.transformer.disable_cache()

    def decode(self, req: EditRequest, result: DenoiseResult) -> tuple[Any, Any]:
        """Latents -> frames (and the trajectory) in ``output_type``. A never-dropped reasoning video decodes as the
        reference does: reasoning frames from all latents but the last, then the edit's frames after its first."""
        if req.output_type == "latent":
            trajectory = result.trajectory_latents
            if req.return_trajectory and trajectory is None:  # never dropped: the latents are the trajectory
                trajectory = result.latents
            return result.latents, trajectory
        with resident(self.vae, self.device, self.offload_models) as vae:
            edit_video = decode_latents(vae, reasoning.keep_edit_frames(result.latents))  # [B, 3, 5, H, W]
            video = edit_video
            if result.latents.shape[2] > 2:
                video = reasoning.join_trajectory(decode_latents(vae, result.latents[:, :, :-1]), edit_video)
            trajectory = None
            if req.return_trajectory:  # never dropped: the video is the trajectory
                trajectory = video
                if result.trajectory_latents is not None:
                    reasoning_video = decode_latents(vae, result.trajectory_latents[:, :, :-1])
                    trajectory = reasoning.join_trajectory(reasoning_video, edit_video)
        frames = postprocess(video, req.output_type)
        return frames, None if trajectory is None else postprocess(trajectory, req.output_type)

    # ----- helpers ---------------------------------------------------------------------------------------------
    def run_callback(
        self, req: EditRequest, i: int, t: torch.Tensor, latents: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, Conditioning]:
        """diffusers-style ``callback_on_step_end(pipe, step, timestep, tensors) -> tensors``."""
        available = {
            "latents": latents,
            "prompt_embeds": cond.prompt_embeds,
            "negative_prompt_embeds": cond.negative_prompt_embeds,
        }
        outputs = req.callback(self, i, t, {k: available[k] for k in req.callback_tensor_inputs}) or {}
        cond.prompt_embeds = outputs.get("prompt_embeds", cond.prompt_embeds)
        cond.negative_prompt_embeds = outputs.get("negative_prompt_embeds", cond.negative_prompt_embeds)
        return outputs.get("latents", latents), cond

    def interrupt(self) -> None:
        """Stop after the current step (callable from a step callback)."""
        self._interrupt = True

    def progress_bar(self, total: int) -> tqdm:
        return tqdm(total=total, desc="denoising", unit="step", **self._progress)

    @property
    def vae_spatial_factor(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_spatial", 8))


def check_finite(latents: torch.Tensor, step: int, total: int, dtype: torch.dtype) -> None:
    """Stop at the first step that produced NaN/Inf rather than after all of them, naming the step (``step`` counts
    from 0) and the dtype the transformer ran in. A UserError: the remedy is the user's (another dtype for float16,
    whose range a large activation overflows; otherwise the checkpoint, a LoRA or its scale)."""
    if torch.isfinite(latents).all():
        return
    if dtype == torch.float16:
        remedy = "an fp16 overflow? run in bf16 or fp32"
    else:
        remedy = "check the checkpoint and any LoRA and its scale"
    name = str(dtype).removeprefix("torch.")
    raise UserError(f"the latents contain NaN or Inf after step {step + 1} of {total} (dtype {name}); {remedy}")


def expand(embeds: torch.Tensor, copies: int) -> torch.Tensor:
    """[B, ...] -> [B * copies, ...], each row repeated ``copies`` times in place (prompt-major order)."""
    return embeds.repeat_interleave(copies, dim=0)
