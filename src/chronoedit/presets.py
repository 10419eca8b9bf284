"""Named recipes for NVIDIA's companion LoRAs: the 8-step distillation, the upscaler and the paint brush.

A preset sets sampling values, wraps the prompt in its LoRA's trigger text and names the LoRA files it needs (found
among the user's ``--lora-path`` files or in the checkpoint's ``lora/`` folder). Explicit flags override its values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

UPSCALE_TRIGGER = (
    "The user want to enhance image clarity and resolution while keeping the content identical. "
    "super-resolution, high detail, 4K clarity, same composition, natural texture."
)
PAINT_BRUSH_TRIGGER = (
    "Turn the pencil sketch in the image into an actual object that is consistent with the image's content. "
    "The user wants to change the sketch to a {prompt}"
)


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None
    prompt_template: str = "{prompt}"
    max_area: int | None = None
    loras: tuple[str, ...] = ()  # a filename fragment per LoRA the preset needs, e.g. "distill"

    def prompt(self, text: str) -> str:
        """The user's prompt inside the preset's trigger text."""
        return " ".join(self.prompt_template.format(prompt=text.strip()).split())

    def describe(self) -> str:
        """One line for ``--help``: what the preset sets."""
        parts = [f"{k}={v}" for k, v in (("steps", self.num_inference_steps), ("guidance", self.guidance_scale),
                 ("flow-shift", self.flow_shift), ("max-area", self.max_area)) if v is not None]  # fmt: skip
        if self.prompt_template != "{prompt}":
            parts.append("trigger prompt added")
        if self.loras:
            parts.append("LoRA: " + " + ".join(f"*{fragment}*" for fragment in self.loras))
        return f"{self.name}: {self.summary} ({', '.join(parts)})"


PRESETS = {
    p.name: p
    for p in (
        Preset("distill", "8-step distilled edit", 8, 1.0, 2.0, loras=("distill",)),
        Preset("upscale", "super-resolution up to ~2K", prompt_template=UPSCALE_TRIGGER + " {prompt}",
               max_area=2048 * 1152, loras=("upscal",)),
        Preset("paint-brush", "black pencil sketch -> object, with the 8-step distillation", 8, 1.0, 2.0,
               prompt_template=PAINT_BRUSH_TRIGGER, loras=("distill", "paint")),
    )
}  # fmt: skip


def get_preset(name: str) -> Preset:
    """The preset called ``name``; UserError naming the known ones otherwise."""
    if name not in PRESETS:
        raise UserError(f"{{preset}} must be one of {', '.join(sorted(PRESETS))}, got {name!r}", "preset")
    return PRESETS[name]


def find_preset_loras(preset: Preset, given: list[Path], checkpoint: Path | None) -> list[Path]:
    """The LoRA files a preset needs that the user did not already name: each looked up by its filename fragment in
    the checkpoint's ``lora/`` folder. Raises UserError naming the missing one."""
    found: list[Path] = []
    for fragment in preset.loras:
        if any(fragment in p.name.lower() for p in given):
            continue
        folder = checkpoint / "lora" if checkpoint is not None else None
        matches = sorted(folder.glob(f"*{fragment}*.safetensors")) if folder is not None and folder.is_dir() else []
        if not matches:
            where = f" (none in {folder})" if folder is not None else ""
            raise UserError(f"{{preset}} {preset.name} needs a *{fragment}* LoRA: pass it with {{lora_path}}{where}",
                            "preset", ("lora_path",))  # fmt: skip
        found.append(matches[0])
    return found
