"""The exact speed-ups: cross-attention keys/values computed once per edit and branch (bit-identical to computing them
every step, recomputed when the embeddings or the weights change) and CFG in one batch (equal to two passes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chronoedit import ChronoEditPipeline, ChronoEditTransformer3DModel
from chronoedit.errors import UserError
from chronoedit.model.context_cache import ContextCache

diffusers = pytest.importorskip("diffusers")

SIZE = {"height": 32, "width": 48}
MODES = {
    "edit_cfg": {"guidance_scale": 5.0, "num_frames": 5},
    "reasoning_dropped_midway": {"guidance_scale": 5.0, "num_frames": 29, "enable_temporal_reasoning": True,
                                 "num_temporal_reasoning_steps": 2},
    "reasoning_never_dropped": {"guidance_scale": 5.0, "num_frames": 29, "enable_temporal_reasoning": True,
                                "num_temporal_reasoning_steps": 4},
}


@pytest.fixture(scope="module")
def pipe(tiny_ckpt_hd128):
    pipe = ChronoEditPipeline.from_pretrained(tiny_ckpt_hd128)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref_transformer(tiny_ckpt_hd128):
    return diffusers.ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt_hd128, subfolder="transformer").eval()


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8"))


def inputs(cfg, seed=0, batch=1, frames=2):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, cfg.in_channels, frames, 4, 6, generator=gen),
        torch.tensor([600] * batch),
        torch.randn(batch, 512, cfg.text_dim, generator=gen),
        torch.randn(batch, 257, cfg.image_dim, generator=gen),
    )


def cross_kv_lora(dim: int, rank: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """A LoRA on the cross-attention's text key/value projections and image key projection of block 0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("to_k", "to_v", "add_k_proj"):
        out[f"transformer.blocks.0.attn2.{name}.lora_A.weight"] = torch.randn(rank, dim, generator=g)
        out[f"transformer.blocks.0.attn2.{name}.lora_B.weight"] = torch.randn(dim, rank, generator=g)
    return out


def run(pipe, image, **kwargs):
    args = {"prompt": "turn the cup red", "num_inference_steps": 4, "output_type": "latent", **SIZE, **kwargs}
    return pipe(image=image, generator=torch.Generator().manual_seed(42), **args).frames


# ------------------------------------------------------------------------------------------- keys/values once
@torch.no_grad()
def test_cached_keys_values_are_bit_identical_and_match_the_reference(pipe, ref_transformer):
    model = pipe.transformer
    x, t, text, clip = inputs(model.config)
    cache = ContextCache()
    plain = model(x, t, text, clip, return_dict=False)[0]
    first = model(x, t, text, clip, return_dict=False, context_cache=cache)[0]
    second = model(x, t + 100, text, clip, return_dict=False, context_cache=cache)[0]  # another step: a hit
    again = model(x, t + 100, text, clip, return_dict=False)[0]
    ref = ref_transformer(x, t, text, clip, return_dict=False)[0]
    assert (cache.misses, cache.hits) == (1, 1)
    assert torch.equal(first, plain) and torch.equal(second, again)
    assert not torch.equal(second, first)  # the step changed the output, the cached context did not
    assert (first - ref).abs().max().item() <= 1e-5


@torch.no_grad()
def test_new_or_edited_embeddings_are_projected_again(pipe):
    model = pipe.transformer
    x, t, text, clip = inputs(model.config)
    cache = ContextCache()
    model(x, t, text, clip, context_cache=cache)
    other = text + 1.0  # another tensor: a miss
    assert torch.equal(model(x, t, other, clip, context_cache=cache).sample, model(x, t, other, clip).sample)
    text.mul_(0.5)  # edited in place (a callback): a miss
    assert torch.equal(model(x, t, text, clip, context_cache=cache).sample, model(x, t, text, clip).sample)
    clip.add_(0.25)
    assert torch.equal(model(x, t, text, clip, context_cache=cache).sample, model(x, t, text, clip).sample)
    assert cache.hits == 0 and cache.misses == 4


@torch.no_grad()
def test_lora_changes_drop_the_cached_keys_values(tiny_ckpt_hd128):
    pipe = ChronoEditPipeline.from_pretrained(tiny_ckpt_hd128)
    model = pipe.transformer
    x, t, text, clip = inputs(model.config, seed=3)
    cache = ContextCache()

    def check() -> None:
        assert torch.equal(model(x, t, text, clip, context_cache=cache).sample, model(x, t, text, clip).sample)

    base = model(x, t, text, clip, context_cache=cache).sample
    name = pipe.load_lora_weights(cross_kv_lora(model.config.inner_dim), adapter_name="kv")
    check()
    assert not torch.equal(model(x, t, text, clip, context_cache=cache).sample, base)
    for change in (lambda: pipe.set_adapters([name], [0.5]), pipe.fuse_lora, pipe.unfuse_lora, pipe.disable_lora,
                   pipe.enable_lora, pipe.unload_lora_weights):  # fmt: skip
        change()
        check()
    restored = model(x, t, text, clip, context_cache=cache).sample  # peft's unmerge rounds: not bit-exact
    assert (restored - base).abs().max().item() <= 1e-5
    with torch.no_grad():
        model.blocks[1].attn2.add_v_proj.weight.mul_(1.5)  # any in-place weight change
    check()


@torch.no_grad()
def test_no_cache_while_autograd_records(pipe):
    model = pipe.transformer
    x, t, text, clip = inputs(model.config)
    cache = ContextCache()
    with torch.enable_grad():
        model(x, t, text, clip, context_cache=cache)
    assert len(cache) == 0 and cache.misses == 0


# ------------------------------------------------------------------------------------ the pipeline: exact modes
@pytest.mark.parametrize("mode", list(MODES))
def test_cfg_batch_equals_two_passes_and_kv_once_is_exact(pipe, image, mode):
    kwargs = MODES[mode]
    batched = run(pipe, image, **kwargs)
    assert pipe.transformer_calls == 4  # one forward per step
    two_passes = run(pipe, image, cfg_batch=False, **kwargs)
    assert pipe.transformer_calls == 8
    assert batched.shape == two_passes.shape
    assert (batched - two_passes).abs().max().item() <= 1e-5
    pipe.reuse_context_kv = False
    try:
        uncached_batched = run(pipe, image, **kwargs)
        uncached_two = run(pipe, image, cfg_batch=False, **kwargs)
    finally:
        pipe.reuse_context_kv = True
    assert torch.equal(batched, uncached_batched) and torch.equal(two_passes, uncached_two)


def test_a_callback_that_changes_the_embeddings_is_seen(pipe, image):
    def halve(_pipe, step, _t, tensors):
        return {"prompt_embeds": tensors["prompt_embeds"] * 0.5} if step == 1 else {}

    def edit_in_place(_pipe, step, _t, tensors):
        if step == 1:
            tensors["negative_prompt_embeds"].add_(0.3)
        return {}

    tensors = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    for callback in (halve, edit_in_place):
        results = []
        for reuse in (True, False):
            pipe.reuse_context_kv = reuse
            try:
                results.append(run(pipe, image, callback_on_step_end=callback,
                                   callback_on_step_end_tensor_inputs=tensors))  # fmt: skip
            finally:
                pipe.reuse_context_kv = True
        assert torch.equal(*results)
    assert not torch.equal(results[0], run(pipe, image))


def test_cfg_batch_must_be_a_bool(pipe, image):
    with pytest.raises(UserError, match="cfg_batch") as err:
        run(pipe, image, cfg_batch="no")
    assert err.value.field == "cfg_batch"


def test_the_model_class_is_ours(pipe):
    assert isinstance(pipe.transformer, ChronoEditTransformer3DModel)
