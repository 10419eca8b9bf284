"""Validation edits during training: the pipeline, with the model being trained, on the first sample(s).

The pipeline runs unchanged except its conditioning step, which returns the cached text/CLIP embeddings, so UMT5 and
CLIP stay unloaded while training; only the (small) VAE and the scheduler are loaded. A plain edit for a pair, an
edit with temporal reasoning (never dropped) for a reasoning video. Written as ``validation/step_000100_<key>.png``:
source, edit and target side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..files import writing
from ..pipeline import ChronoEditPipeline, Conditioning
from .cache import CacheEntry, load_entry, load_negative
from .data import PAIR_FRAMES, TRAJECTORY_FRAMES, prepared_frames


class CachedConditioningPipeline(ChronoEditPipeline):
    """ChronoEditPipeline whose text and image conditioning come from the training cache."""

    cached_image_embeds: torch.Tensor | None = None  # [1, 257, image_dim]

    def encode_conditioning(self, req: Any) -> Conditioning:
        dtype, device = self.transformer.dtype, self.device
        negative = req.negative_prompt_embeds
        return Conditioning(
            prompt_embeds=req.prompt_embeds.to(device, dtype),
            negative_prompt_embeds=None if not req.do_cfg else negative.to(device, dtype),
            image_embeds=self.cached_image_embeds.to(device, dtype),
        )


@dataclass
class Validator:
    """Runs validation edits; the VAE and scheduler load on first use."""

    model_path: str
    entries: list[CacheEntry]
    negative_file: Path
    folder: Path
    steps: int
    guidance_scale: float
    flow_shift: float
    size: tuple[int | None, int | None, int, bool]  # height, width, max_area, buckets
    device: torch.device
    _pipe: CachedConditioningPipeline | None = None

    def pipe(self, transformer: torch.nn.Module) -> CachedConditioningPipeline:
        from ..loading import load_component

        if self._pipe is None:
            vae = load_component(self.model_path, "vae")
            scheduler = load_component(self.model_path, "scheduler")
            self._pipe = CachedConditioningPipeline(None, None, None, None, transformer, vae, scheduler)
            self._pipe.set_flow_shift(self.flow_shift)
            self._pipe.set_progress_bar_config(disable=True)
            self._pipe.to(self.device)
        self._pipe.transformer = transformer
        return self._pipe

    @torch.no_grad()
    def run(self, transformer: torch.nn.Module, step: int) -> list[Path]:
        """Edit each validation sample with ``transformer`` (put in eval mode meanwhile); returns the written files."""
        pipe = self.pipe(transformer)
        was_training = transformer.training
        transformer.eval()
        written = []
        try:
            for entry in self.entries:
                written.append(self._edit(pipe, entry, step))
        finally:
            transformer.train(was_training)
        return written

    def _edit(self, pipe: CachedConditioningPipeline, entry: CacheEntry, step: int) -> Path:
        from ..media import save_image

        tensors = load_entry(entry)
        frames = prepared_frames(entry.spec, *self.size)
        num_frames = PAIR_FRAMES if len(frames) == 2 else TRAJECTORY_FRAMES + PAIR_FRAMES - 1  # 5, or 29 (8 latent)
        pipe.cached_image_embeds = tensors["image_embeds"][None]
        out = pipe(
            image=frames[0],
            prompt_embeds=tensors["prompt_embeds"][None],
            negative_prompt_embeds=load_negative(self.negative_file)[None],
            height=frames[0].height,
            width=frames[0].width,
            num_frames=num_frames,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            generator=torch.Generator().manual_seed(0),
            output_type="pil",
            enable_temporal_reasoning=num_frames > 5,
        )
        edit = out.frames[0][-1]
        sheet = Image.new("RGB", (edit.width * 3, edit.height))
        for i, image in enumerate((frames[0], edit, frames[-1])):
            sheet.paste(image, (i * edit.width, 0))
        path = self.folder / f"step_{step:06d}_{_safe(entry.spec.key)}.png"
        with writing(path):
            self.folder.mkdir(parents=True, exist_ok=True)
            return save_image(sheet, path)


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)[:64]
