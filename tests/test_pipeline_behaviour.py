"""Pipeline behaviour beyond parity: component placement, NaN handling, flow shift, callbacks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import chronoedit.pipeline as pipeline_module
from chronoedit import ChronoEditPipeline
from chronoedit.errors import UserError

ARGS = {"prompt": "a red cup", "height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 1.0}


@pytest.fixture
def pipe(tiny_ckpt):
    pipe = ChronoEditPipeline.from_pretrained(tiny_ckpt)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype("uint8"))


def spy_residency(monkeypatch, pipe):
    """Record (component, offload flag) every time a component is brought to the device."""
    names = {id(getattr(pipe, n)): n for n in ("text_encoder", "image_encoder", "transformer", "vae")}
    seen: list[tuple[str, bool]] = []
    real = pipeline_module.resident

    def spy(module, device, offload):
        seen.append((names.get(id(module), "?"), offload))
        return real(module, device, offload)

    monkeypatch.setattr(pipeline_module, "resident", spy)
    return seen


def test_encoders_leave_the_device_before_denoising(pipe, image, monkeypatch):
    seen = spy_residency(monkeypatch, pipe)
    pipe(image=image, **ARGS)
    flags = dict(seen)
    assert flags["text_encoder"] is True and flags["image_encoder"] is True
    assert flags["transformer"] is False and flags["vae"] is False
    order = [name for name, _ in seen]
    assert order.index("text_encoder") < order.index("transformer")


def test_model_offload_moves_every_component(pipe, image, monkeypatch):
    pipe.enable_model_cpu_offload("cpu")
    seen = spy_residency(monkeypatch, pipe)
    pipe(image=image, **ARGS)
    assert {name for name, offload in seen if offload} == {"text_encoder", "image_encoder", "transformer", "vae"}


def test_non_finite_latents_raise_a_clear_error(pipe, image):
    def poison(_pipe, _step, _t, tensors):
        return {"latents": tensors["latents"] * float("nan")}

    with pytest.raises(UserError, match="NaN or Inf"):
        pipe(image=image, callback_on_step_end=poison, **ARGS)


def test_flow_shift_changes_the_schedule(pipe, image):
    pipe.set_flow_shift(5.0)
    pipe.scheduler.set_timesteps(4)
    shift5 = pipe.scheduler.sigmas.clone()
    pipe.set_flow_shift(2.0)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.config.flow_shift == 2.0
    assert (pipe.scheduler.sigmas[1:-1] < shift5[1:-1]).all()  # a lower shift spends less time at high noise


def test_callback_sees_every_step_and_can_interrupt(pipe, image):
    steps = []

    def stop_after_first(p, step, _t, tensors):
        steps.append(step)
        p.interrupt()
        return tensors

    pipe(image=image, callback_on_step_end=stop_after_first, **{**ARGS, "num_inference_steps": 3})
    assert steps == [0]


def test_default_size_is_the_720x1280_area_at_the_image_aspect(pipe, monkeypatch):
    """Without height/width the edit runs at NVIDIA's 720x1280 area; caught on the request before any model runs."""

    class Stop(Exception):
        pass

    def stop(req):
        raise Stop(req)

    monkeypatch.setattr(pipe, "encode_conditioning", stop)
    with pytest.raises(Stop) as caught:
        pipe(image=Image.new("RGB", (640, 360)), prompt="x")
    req = caught.value.args[0]
    assert (req.width, req.height, req.num_frames) == (1280, 720, 5)


def test_flow_shift_reaches_flow_match_euler(pipe):
    """FlowMatchEuler calls it ``shift``: the setting must not be silently lost."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    pipe.set_flow_shift(2.0)
    assert pipe.scheduler.config.shift == 2.0
    with pytest.raises(UserError, match="flow_shift must be a positive finite number") as caught:
        pipe.set_flow_shift(float("inf"))
    assert caught.value.field == "flow_shift"


def test_nan_is_caught_at_the_step_that_made_it(pipe, image):
    calls = []

    def poison_second(_pipe, step, _t, tensors):
        calls.append(step)
        return {"latents": tensors["latents"] * (float("nan") if step == 0 else 1.0)}

    with pytest.raises(UserError, match="after step 2"):
        pipe(image=image, callback_on_step_end=poison_second, **{**ARGS, "num_inference_steps": 4})
    assert calls == [0]  # stopped right after the poisoned latents went through one step


@pytest.mark.parametrize("kind", ["pil_rgba", "tensor_minus1_1", "tensor_batched"])
def test_image_inputs_match_the_equivalent_pil(kind):
    """Tensors in [-1, 1] (diffusers' convention) and [1, 3, H, W] are understood; RGBA goes on white."""
    import torch

    from chronoedit.request import as_pil

    rgb = np.random.RandomState(2).randint(0, 256, (8, 8, 3)).astype(np.uint8)
    if kind == "pil_rgba":
        rgba = np.dstack([rgb, np.zeros((8, 8), np.uint8)])  # fully transparent: white
        assert np.all(np.asarray(as_pil(Image.fromarray(rgba, "RGBA"))) == 255)
        return
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
    given = tensor * 2 - 1 if kind == "tensor_minus1_1" else tensor[None]
    assert np.abs(np.asarray(as_pil(given), dtype=int) - rgb.astype(int)).max() <= 1
