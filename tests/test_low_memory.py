"""Low-memory mode (issue 14, item 3): UMT5, CLIP and the VAE are built when their stage starts and dropped when it
ends, so none of them is alive while the transformer denoises; the edit is the same, bit for bit; it turns itself on
when the components would not fit in the memory available; batch runners keep the transformer between edits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chronoedit import ChronoEditPipeline
from chronoedit.editing import EditRunner, EditSettings, load_pipeline, resolve_edit, resolve_model
from chronoedit.lazy import LazyComponent

LAZY = ("text_encoder", "image_encoder", "vae")


def image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8"))


def run(pipe, **kwargs):
    kwargs.setdefault("prompt", "turn the cup red")
    return pipe(image=image(), num_inference_steps=3, height=32, width=48,
                generator=torch.Generator().manual_seed(5), output_type="np", **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def pipes(tiny_ckpt):
    out = {}
    for low in (False, True):
        pipe = ChronoEditPipeline.from_pretrained(tiny_ckpt, low_memory=low)
        pipe.set_progress_bar_config(disable=True)
        out[low] = pipe
    return out


@pytest.mark.parametrize("reasoning", [False, True])
def test_the_edit_is_the_same_and_no_encoder_lives_while_denoising(pipes, reasoning):
    low = pipes[True]
    alive_at_steps = []

    def spy(_pipe, _step, _t, tensors):
        alive_at_steps.append([name for name in LAZY if getattr(low, name).module is not None])
        return tensors

    kwargs = {"enable_temporal_reasoning": True, "num_frames": 29, "num_temporal_reasoning_steps": 1,
              "return_trajectory": True} if reasoning else {}  # fmt: skip
    loads = {name: getattr(low, name).loads for name in LAZY}
    ours = run(low, callback_on_step_end=spy, **kwargs)
    plain = run(pipes[False], **kwargs)
    assert np.array_equal(ours.frames, plain.frames)
    if reasoning:
        assert np.array_equal(ours.trajectory, plain.trajectory)
    assert alive_at_steps == [[], [], []]  # three steps, nothing but the transformer alive
    assert all(getattr(low, name).module is None for name in LAZY)  # all dropped after the edit
    built = {name: getattr(low, name).loads - loads[name] for name in LAZY}
    assert built == {"text_encoder": 1, "image_encoder": 1, "vae": 2}  # the VAE encodes, then later decodes


def test_given_embeddings_do_not_build_the_text_encoder(pipes):
    low = pipes[True]
    embeds = torch.zeros(1, 512, 32)
    before = low.text_encoder.loads
    run(low, prompt_embeds=embeds, negative_prompt_embeds=embeds, prompt=None)
    assert low.text_encoder.loads == before


def test_it_turns_itself_on_when_memory_is_short(tiny_ckpt, monkeypatch):
    import chronoedit.memory as memory

    notes = []
    from chronoedit.editing import Report

    report = Report(note=notes.append)
    spec = resolve_model(model_path=str(tiny_ckpt), device="cpu")
    assert spec.low_memory is None
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 10**12)
    assert not isinstance(load_pipeline(spec, report).vae, LazyComponent) and not notes
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 1000)
    pipe = load_pipeline(spec, report)
    assert all(isinstance(getattr(pipe, name), LazyComponent) for name in LAZY)
    assert len(notes) == 1 and "--low-memory" in notes[0] and "\n" not in notes[0]
    forced_off = load_pipeline(resolve_model(model_path=str(tiny_ckpt), device="cpu", low_memory=False), report)
    assert not isinstance(forced_off.text_encoder, LazyComponent)


def test_a_runner_keeps_the_transformer_between_edits(tiny_ckpt):
    spec = resolve_model(model_path=str(tiny_ckpt), device="cpu", low_memory=True)
    runner = EditRunner(spec)
    edit = resolve_edit(EditSettings(prompt="a", num_inference_steps=1, height=32, width=48), spec, image())
    runner.run(edit)
    transformer = runner.pipe.transformer
    runner.run(edit)
    assert runner.pipe.transformer is transformer  # loaded once
    assert runner.pipe.vae.loads == 4 and runner.pipe.vae.module is None  # the VAE comes and goes per stage


def test_cli_low_memory_writes_the_same_image(tiny_ckpt, tmp_path):
    from chronoedit.cli import main

    args = ["edit", "--model-path", str(tiny_ckpt), "-p", "x", "--num-inference-steps", "2", "--height", "32",
            "--width", "48", "--quiet"]  # fmt: skip
    assert main([*args, "-o", str(tmp_path / "low.png"), "--low-memory"]) == 0
    assert main([*args, "-o", str(tmp_path / "all.png")]) == 0
    low, full = (np.asarray(Image.open(tmp_path / n)) for n in ("low.png", "all.png"))
    assert np.array_equal(low, full)
