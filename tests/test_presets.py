"""Presets and per-LoRA scales on the command line, resolved before any model loads."""

from __future__ import annotations

import pytest
from PIL import Image

from chronoedit import cli
from chronoedit.commands import edit as edit_cmd
from chronoedit.editing import LoraSpec
from chronoedit.presets import PAINT_BRUSH_TRIGGER, PRESETS, UPSCALE_TRIGGER


@pytest.fixture
def setup(tmp_path, monkeypatch):
    image = tmp_path / "in.png"
    Image.new("RGB", (640, 360), "white").save(image)
    ckpt = tmp_path / "ckpt"
    (ckpt / "lora").mkdir(parents=True)
    (ckpt / "lora" / "chronoedit_distill_lora.safetensors").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    return image, ckpt


def job(image, ckpt, *flags):
    args = cli.parse_args(["edit", "-i", str(image), "-p", "a red hat", "--model-path", str(ckpt), *map(str, flags)])
    return edit_cmd.resolve(args)[1]


def test_distill_preset_sets_steps_guidance_shift_and_finds_the_lora(setup):
    image, ckpt = setup
    j = job(image, ckpt, "--preset", "distill")
    assert (j.num_inference_steps, j.guidance_scale, j.flow_shift) == (8, 1.0, 2.0)
    assert j.loras == (LoraSpec(ckpt / "lora" / "chronoedit_distill_lora.safetensors", 1.0),)
    assert j.prompt == "a red hat"


def test_explicit_flags_override_the_preset(setup):
    image, ckpt = setup
    j = job(
        image, ckpt, "--preset", "distill", "--num-inference-steps", "12", "--guidance-scale", "3", "--flow-shift", "4"
    )
    assert (j.num_inference_steps, j.guidance_scale, j.flow_shift) == (12, 3.0, 4.0)


def test_without_preset_the_defaults_stay(setup):
    image, ckpt = setup
    j = job(image, ckpt)
    assert (j.num_inference_steps, j.guidance_scale, j.flow_shift, j.loras) == (50, 5.0, 5.0, ())


def test_per_lora_scales(setup, tmp_path):
    image, ckpt = setup
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    j = job(image, ckpt, "--lora-path", f"{a}:0.8", str(b), "--lora-scale", "0.5")
    assert j.loras == (LoraSpec(a, 0.8), LoraSpec(b, 0.5))


def test_user_lora_satisfies_the_preset(setup, tmp_path):
    image, ckpt = setup
    mine = tmp_path / "my_distill_v2.safetensors"
    mine.write_bytes(b"x")
    j = job(image, ckpt, "--preset", "distill", "--lora-path", f"{mine}:0.9")
    assert j.loras == (LoraSpec(mine, 0.9),)


def test_upscale_preset_adds_the_trigger_and_a_2k_area(setup, tmp_path):
    image, ckpt = setup
    (ckpt / "lora" / "chronoedit_upscaler_lora.safetensors").write_bytes(b"x")
    j = job(image, ckpt, "--preset", "upscale")
    assert j.prompt.startswith(UPSCALE_TRIGGER) and j.prompt.endswith("a red hat")
    assert (j.width, j.height) == (2048, 1152)
    assert j.loras[0].path.name == "chronoedit_upscaler_lora.safetensors"


def test_paint_brush_prompt_and_both_loras(setup):
    image, ckpt = setup
    (ckpt / "lora" / "paintbrush_lora.safetensors").write_bytes(b"x")
    j = job(image, ckpt, "--preset", "paint-brush")
    assert j.prompt == PAINT_BRUSH_TRIGGER.format(prompt="a red hat")
    names = [lora.path.name for lora in j.loras]
    assert names == ["chronoedit_distill_lora.safetensors", "paintbrush_lora.safetensors"]
    assert j.num_inference_steps == 8


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--preset", "upscale"], "--preset upscale needs a *upscal* LoRA"),
        (["--lora-path", "missing.safetensors:0.5"], "LoRA file not found: missing.safetensors"),
    ],
)
def test_missing_lora_is_one_line_exit_2(setup, capsys, flags, message):
    image, ckpt = setup
    argv = ["edit", "-i", str(image), "-p", "x", "--model-path", str(ckpt), *flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_help_lists_what_each_preset_sets(capsys):
    assert cli.main(["edit", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for preset in PRESETS.values():
        assert preset.name in text
    assert "steps=8, guidance=1.0, flow-shift=2.0" in text
