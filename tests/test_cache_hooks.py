"""Step caches through diffusers' own hooks: our transformer speaks their protocol (block metadata, cache contexts),
each CFG branch keeps its own state, the reasoning drop resets it. Parity against diffusers on identical weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chronoedit import ChronoEditPipeline
from chronoedit.errors import UserError

diffusers = pytest.importorskip("diffusers")
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig  # noqa: E402
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry  # noqa: E402

TOL = 1e-4
STEPS = 8
SIZE = {"height": 32, "width": 48}
# name -> a fresh config each call (hooks keep state in them); thresholds that skip steps on the tiny model
CONFIGS = {
    "first-block": lambda: FirstBlockCacheConfig(threshold=0.2),
    "mag": lambda: MagCacheConfig(threshold=0.5, max_skip_steps=2, retention_ratio=0.2, num_inference_steps=STEPS,
                                  mag_ratios=[1.0] + [0.95] * (STEPS - 1)),
    "taylorseer": lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, use_lite_mode=True,
                                                taylor_factors_dtype=torch.float32),
}


def register_reference_block() -> None:
    """diffusers ships ChronoEdit's block unregistered for its cache hooks (REFERENCE.md §10); the oracle needs it."""
    from diffusers.models.transformers.transformer_chronoedit import WanTransformerBlock

    if WanTransformerBlock not in TransformerBlockRegistry._registry:
        TransformerBlockRegistry.register(WanTransformerBlock, TransformerBlockMetadata(return_hidden_states_index=0))


@pytest.fixture(scope="module")
def pipe(tiny_ckpt_hd128):
    pipe = ChronoEditPipeline.from_pretrained(tiny_ckpt_hd128)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref_transformer(tiny_ckpt_hd128):
    register_reference_block()
    return diffusers.ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt_hd128, subfolder="transformer").eval()


@pytest.fixture(scope="module")
def ref_pipe(tiny_ckpt_hd128, ref_transformer):
    pipe = diffusers.ChronoEditPipeline.from_pretrained(tiny_ckpt_hd128, transformer=ref_transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def loop_with_ref(tiny_ckpt_hd128, ref_transformer):
    """Our pipeline (our sampling loop) driving diffusers' transformer."""
    pipe = ChronoEditPipeline.from_pretrained(tiny_ckpt_hd128, transformer=ref_transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8"))


class FullForwards:
    """Counts forwards that ran every block (the last block's FFN only runs when nothing was skipped)."""

    def __init__(self, transformer):
        self.count = 0
        self.handle = transformer.blocks[-1].ffn.register_forward_hook(self.hit)

    def hit(self, *_):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


def run(pipe, image, **kwargs):
    args = {"prompt": "turn the cup red", "num_inference_steps": STEPS, "output_type": "latent", **SIZE, **kwargs}
    return pipe(image=image, generator=torch.Generator().manual_seed(42), **args).frames


def counted(pipe, image, **kwargs):
    with FullForwards(pipe.transformer) as full:
        return run(pipe, image, **kwargs), full.count


@pytest.mark.parametrize("name", list(CONFIGS))
def test_guidance_one_matches_diffusers_pipeline_with_the_same_cache(pipe, ref_pipe, image, name):
    ours, our_full = counted(pipe, image, guidance_scale=1.0, cache=CONFIGS[name]())
    ref_pipe.transformer.enable_cache(CONFIGS[name]())
    try:
        with FullForwards(ref_pipe.transformer) as full, ref_pipe.transformer.cache_context("cond"):
            ref = run(ref_pipe, image, guidance_scale=1.0)
    finally:
        ref_pipe.transformer.disable_cache()
    plain = run(pipe, image, guidance_scale=1.0)
    assert our_full == full.count < STEPS  # the same steps skipped, and some were
    assert (ours - ref).abs().max().item() <= TOL
    assert (ours - plain).abs().max().item() > 10 * TOL  # the cache changed the result: the check has teeth


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("reasoning", [False, True])
def test_cfg_matches_diffusers_transformer_with_a_cache_context_per_branch(pipe, loop_with_ref, image, name,
                                                                           reasoning):  # fmt: skip
    kwargs = {"guidance_scale": 5.0}
    if reasoning:  # the drop at step 3 resets the caches (8 -> 2 latent frames)
        kwargs |= {"num_frames": 29, "enable_temporal_reasoning": True, "num_temporal_reasoning_steps": 3}
    ours, our_full = counted(pipe, image, cache=CONFIGS[name](), **kwargs)
    assert pipe.transformer_calls == 2 * STEPS  # two passes while a cache is on
    ref, ref_full = counted(loop_with_ref, image, cache=CONFIGS[name](), **kwargs)
    assert our_full == ref_full < 2 * STEPS
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL


def test_a_zero_threshold_skips_nothing_and_changes_nothing(pipe, image, tiny_ckpt_hd128):
    kwargs = {"num_frames": 29, "enable_temporal_reasoning": True, "num_temporal_reasoning_steps": 3}
    cached, full = counted(pipe, image, cache="first-block:0", **kwargs)
    assert full == 2 * STEPS
    assert (cached - run(pipe, image, **kwargs)).abs().max().item() <= 1e-5


def test_caches_work_with_an_unfused_lora(tiny_ckpt_hd128, image):
    from tiny_loras import attention_lora

    pipe = ChronoEditPipeline.from_pretrained(tiny_ckpt_hd128)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(attention_lora(tiny_ckpt_hd128, tiny_ckpt_hd128.parent / "cache-lora.safetensors"))
    exact, full = counted(pipe, image, cache="first-block:0")
    assert full == 2 * STEPS
    assert (exact - run(pipe, image)).abs().max().item() <= 1e-5
    _, full = counted(pipe, image, cache="first-block:1")
    assert full < 2 * STEPS


def test_the_cache_is_removed_after_the_call_and_a_users_own_cache_is_used(pipe, image):
    named = run(pipe, image, cache="first-block:0.2")
    assert not pipe.transformer.is_cache_enabled
    assert all(not getattr(block, "_diffusers_hook", None) or not block._diffusers_hook.hooks
               for block in pipe.transformer.blocks)  # fmt: skip
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    try:
        with pytest.raises(UserError, match="already has a step cache") as err:
            run(pipe, image, cache="first-block:0.1")
        assert err.value.field == "cache"
        own = run(pipe, image)  # the user's cache, one context per branch, reset at the start of each call
        assert torch.equal(own, run(pipe, image))
    finally:
        pipe.transformer.disable_cache()
    assert (own - named).abs().max().item() <= 1e-6


@pytest.mark.parametrize("text", ["fast", "first-block:x", "first-block:2", "taylorseer:1.5", "taylorseer:0", 3])
def test_bad_cache_names_are_user_errors(pipe, image, text):
    with pytest.raises(UserError) as err:
        run(pipe, image, cache=text)
    assert err.value.field == "cache"
