"""The transformer from single safetensors files: diffusers names, original Wan/ComfyUI names, fp8 with scales."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from chronoedit import ChronoEditTransformer3DModel
from chronoedit.errors import UserError
from chronoedit.keymap import ours_to_original
from chronoedit.loading import load_transformer

FP8_MAX = 448.0  # largest float8_e4m3fn value


@pytest.fixture(scope="module")
def reference(tiny_ckpt_hd128):
    return ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt_hd128, subfolder="transformer")


def forward(model: ChronoEditTransformer3DModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=gen)
    text, clip = torch.randn(1, 512, cfg.text_dim, generator=gen), torch.randn(1, 257, cfg.image_dim, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([400]), text, clip).sample


def weights(model: ChronoEditTransformer3DModel) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def test_single_file_with_diffusers_names_infers_the_config(reference, tmp_path):
    path = tmp_path / "chronoedit.safetensors"
    save_file(weights(reference), str(path))
    model = load_transformer(path)
    assert model.config.num_layers == reference.config.num_layers
    assert model.config.num_attention_heads == reference.config.num_attention_heads
    assert model.config.rope_temporal_skip_len == 8
    assert torch.equal(forward(model), forward(reference))


def test_comfy_single_file_with_original_names(reference, tmp_path):
    """Original Wan names under ComfyUI's prefix, including the norm2/norm3 swap."""
    original = {"model.diffusion_model." + ours_to_original(k): v for k, v in weights(reference).items()}
    assert "model.diffusion_model.blocks.0.norm3.weight" in original
    assert "model.diffusion_model.blocks.0.cross_attn.k_img.weight" in original
    path = tmp_path / "chrono_edit_14B_fp16.safetensors"
    save_file(original, str(path))
    assert torch.equal(forward(load_transformer(path)), forward(reference))


def test_fp8_scaled_single_file(reference, tmp_path):
    """e4m3 weights with per-tensor scales (ComfyUI's fp8_scaled): dequantised on load, close to the original."""
    quantised: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in weights(reference).items():
        name = ours_to_original(key)
        if value.ndim == 2 and key.endswith(".weight"):
            scale = value.abs().max() / FP8_MAX
            quantised[name] = (value / scale).to(torch.float8_e4m3fn)
            quantised[name.rsplit(".", 1)[0] + ".scale_weight"] = scale.reshape(1)
        else:
            quantised[name] = value
    path = tmp_path / "chronoedit_fp8_scaled.safetensors"
    save_file(quantised, str(path))
    model = load_transformer(path, torch_dtype=torch.float32)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.float32
    ref_out, out = forward(reference), forward(model)
    rel = ((out - ref_out).norm() / ref_out.norm()).item()
    assert rel < 0.1, rel  # e4m3 keeps ~3 bits of mantissa: a few percent, not a different model
    assert rel > 0  # it really went through fp8


def test_unknown_original_key_is_named(reference, tmp_path):
    original = {"diffusion_model." + ours_to_original(k): v for k, v in weights(reference).items()}
    original["diffusion_model.blocks.0.self_attn.mystery.weight"] = torch.zeros(2)
    path = tmp_path / "bad.safetensors"
    save_file(original, str(path))
    with pytest.raises(UserError, match=r"self_attn\.mystery"):
        load_transformer(path)


def test_explicit_config_for_a_single_file(tiny_ckpt, tmp_path):
    """head_dim 16 cannot be inferred (Wan uses 128): the caller passes the config."""
    folder_model = ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt, subfolder="transformer")
    path = tmp_path / "tiny.safetensors"
    save_file(weights(folder_model), str(path))
    model = load_transformer(path, config=folder_model.config)
    assert torch.equal(forward(model), forward(folder_model))
