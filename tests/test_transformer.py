"""Transformer switches: gradient checkpointing, the fp32 islands of a reduced-precision cast."""

from __future__ import annotations

import torch

from chronoedit import ChronoEditTransformer3DModel


def tiny_model() -> ChronoEditTransformer3DModel:
    """The same random weights every time, without moving the global RNG other tests draw from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ChronoEditTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, text_dim=8, ffn_dim=32, num_layers=2, image_dim=8,
            added_kv_proj_dim=32,
        )  # fmt: skip


def inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randn(1, 36, 2, 4, 4, generator=gen),
        torch.tensor([500]),
        torch.randn(1, 512, 8, generator=gen),
        torch.randn(1, 257, 8, generator=gen),
    )


def grads(model: ChronoEditTransformer3DModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(*inputs()).sample
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    model = tiny_model().train()
    plain_out, plain_grads = grads(model)
    model.enable_gradient_checkpointing()
    ckpt_out, ckpt_grads = grads(model)
    assert torch.equal(plain_out, ckpt_out)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) == len(list(model.parameters()))
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6), name


def test_cast_to_bf16_keeps_the_fp32_islands_and_runs():
    model = tiny_model().cast_to(torch.bfloat16)
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert "scale_shift_table" in fp32 and "blocks.0.scale_shift_table" in fp32
    assert "condition_embedder.time_embedder.linear_1.weight" in fp32
    assert "blocks.0.norm2.weight" in fp32 and "condition_embedder.image_embedder.norm1.weight" in fp32
    assert model.proj_out.weight.dtype == torch.bfloat16 and model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    x, t, text, image = inputs()
    with torch.no_grad():
        out = model(x.bfloat16(), t, text.bfloat16(), image.bfloat16()).sample
        ref = tiny_model()(x, t, text, image).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 rounding, not a different function
