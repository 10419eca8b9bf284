"""Same numbers as the reference: our transformer and pipeline against diffusers' on identical weights (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chronoedit import ChronoEditPipeline, ChronoEditTransformer3DModel

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
SIZE = {"height": 32, "width": 48}


@pytest.fixture(scope="module")
def ref_transformer(tiny_ckpt_hd128):
    return diffusers.ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt_hd128, subfolder="transformer").eval()


@pytest.fixture(scope="module")
def our_transformer(tiny_ckpt_hd128):
    return ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt_hd128, subfolder="transformer")


@pytest.fixture(scope="module")
def ref_pipe(tiny_ckpt_hd128, ref_transformer):
    pipe = diffusers.ChronoEditPipeline.from_pretrained(tiny_ckpt_hd128, transformer=ref_transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def our_pipe(tiny_ckpt_hd128):
    pipe = ChronoEditPipeline.from_pretrained(tiny_ckpt_hd128)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8"))


def test_state_dict_keys_match_reference(our_transformer, ref_transformer):
    ours = {k: tuple(v.shape) for k, v in our_transformer.state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in ref_transformer.state_dict().items()}
    assert ours == ref


@pytest.mark.parametrize("frames", [2, 3, 8])
def test_transformer_forward_matches_reference(our_transformer, ref_transformer, frames):
    """head_dim 128 (RoPE split 44/42/42); 2 frames exercises the temporal skip (positions 0 and 7)."""
    gen = torch.Generator().manual_seed(frames)
    cfg = our_transformer.config
    x = torch.randn(1, cfg.in_channels, frames, 4, 6, generator=gen)
    text = torch.randn(1, 512, cfg.text_dim, generator=gen)
    clip = torch.randn(1, 257, cfg.image_dim, generator=gen)
    t = torch.tensor([731])
    with torch.no_grad():
        ours = our_transformer(x, t, text, clip, return_dict=False)[0]
        ref = ref_transformer(x, t, text, clip, return_dict=False)[0]
    assert ours.shape == (1, cfg.out_channels, frames, 4, 6)
    assert ours.abs().mean() > 0.1  # a real signal, not zeros
    assert (ours - ref).abs().max().item() <= 1e-5


def test_temporal_skip_changes_the_two_frame_output(our_transformer):
    """The skip matters: placing the 2 frames at 0 and 1 (plain Wan) gives another result."""
    cfg = our_transformer.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=gen)
    text, clip = torch.randn(1, 512, cfg.text_dim, generator=gen), torch.randn(1, 257, cfg.image_dim, generator=gen)
    with torch.no_grad():
        skip = our_transformer(x, torch.tensor([500]), text, clip).sample
        our_transformer.rope.temporal_skip_len = 2
        our_transformer.rope._cache.clear()
        try:
            plain = our_transformer(x, torch.tensor([500]), text, clip).sample
        finally:
            our_transformer.rope.temporal_skip_len = cfg.rope_temporal_skip_len
            our_transformer.rope._cache.clear()
    assert (skip - plain).abs().max() > 1e-3


MODES = {
    "edit_cfg": {"guidance_scale": 5.0, "num_frames": 5},
    "edit_no_cfg": {"guidance_scale": 1.0, "num_frames": 5},
    "reasoning_dropped_midway": {
        "guidance_scale": 5.0,
        "num_frames": 29,
        "enable_temporal_reasoning": True,
        "num_temporal_reasoning_steps": 2,
    },
    "reasoning_never_dropped": {
        "guidance_scale": 5.0,
        "num_frames": 29,
        "enable_temporal_reasoning": True,
        "num_temporal_reasoning_steps": 4,
    },
}


def run(pipe, image, output_type, **kwargs):
    generator = torch.Generator().manual_seed(42)
    args = {"prompt": "turn the cup red", "num_inference_steps": 4, **SIZE, **kwargs}
    return pipe(image=image, generator=generator, output_type=output_type, **args).frames


def run_with_latents(pipe, image, **kwargs):
    """Frames (np) and the final latents, caught by a step callback, from one run."""
    caught = {}

    def catch(_pipe, _step, _t, tensors):
        caught["latents"] = tensors["latents"].clone()
        return tensors

    frames = run(pipe, image, "np", callback_on_step_end=catch, **kwargs)
    return frames, caught["latents"]


@pytest.mark.parametrize("mode", list(MODES))
def test_pipeline_matches_reference(our_pipe, ref_pipe, image, mode):
    kwargs = MODES[mode]
    ours, ours_latents = run_with_latents(our_pipe, image, **kwargs)
    ref, ref_latents = run_with_latents(ref_pipe, image, **kwargs)
    frames = 5 if mode == "reasoning_dropped_midway" else kwargs["num_frames"]
    assert ours.shape == ref.shape == (1, frames, 32, 48, 3)
    assert np.isfinite(ours).all()
    assert np.abs(ours - ref).max() <= TOL
    assert ours_latents.shape == ref_latents.shape
    assert (ours_latents - ref_latents).abs().max().item() <= TOL


def test_modes_are_distinguishable(our_pipe, image):
    """Guards the parity tests: guidance and reasoning really change the latents the test compares."""
    cfg = run(our_pipe, image, "latent", **MODES["edit_cfg"])
    no_cfg = run(our_pipe, image, "latent", **MODES["edit_no_cfg"])
    dropped = run(our_pipe, image, "latent", **MODES["reasoning_dropped_midway"])
    assert (cfg - no_cfg).abs().max() > 1e-2
    assert (cfg - dropped).abs().max() > 1e-2


def test_pil_and_pt_outputs_match_reference_layout(our_pipe, ref_pipe, image):
    for output_type in ("pt", "pil"):
        ours = run(our_pipe, image, output_type, **MODES["edit_no_cfg"])
        ref = run(ref_pipe, image, output_type, **MODES["edit_no_cfg"])
        if output_type == "pt":
            assert ours.shape == ref.shape == (1, 5, 3, 32, 48)
            assert (ours - ref).abs().max() <= TOL
        else:
            assert len(ours) == len(ref) == 1 and len(ours[0]) == len(ref[0]) == 5
            assert ours[0][-1].size == ref[0][-1].size == (48, 32)
            diff = np.abs(np.asarray(ours[0][-1], dtype=int) - np.asarray(ref[0][-1], dtype=int))
            assert diff.max() <= 1
