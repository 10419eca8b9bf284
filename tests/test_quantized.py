"""Quantized transformers kept quantized in memory: GGUF (city96-style, original Wan names) and fp8 / fp8-scaled
safetensors load as QuantizedLinear layers that dequantize per call.

The GGUF files are written here with ``gguf.GGUFWriter`` from the tiny head-dim-128 transformer; block types the
numpy package can quantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16) use ``gguf.quants.quantize``; K-quants (which it can
only dequantize) are packed by the small reference quantizers below, checked against ``gguf.quants.dequantize``.
Our torch dequantization is compared with ``gguf.quants.dequantize`` (the oracle) bit for bit.

Measured (relative L2 error of the forward vs the fp32 model; of the quantized Linear weights in brackets):
Q8_0 0.71% (0.46%), Q6_K 2.5% (1.7%), Q5_K 5.5% (3.5%), Q5_1 5.2% (3.4%), Q5_0 5.0% (3.7%), Q4_K 9.4% (7.1%),
Q4_1 10.7% (7.0%), Q4_0 11.2% (7.5%), fp8 e4m3 scaled 3.8% (2.6%), e4m3 unscaled 4.2% (2.7%), e5m2 scaled 7.7% (5.3%).
The tiny model's weights are uniform random (the weight errors are the textbook step/sqrt(12) of each format) and the
reference K-quant packers pick scales naively (llama.cpp searches for better ones); the bounds asserted are the
measured values with ~30% headroom. A LoRA's change of the output on a quantized model vs on the fp32 model: Q8_0
0.74%, fp8 3.2%. Dequantizing per layer is the same math as dequantizing at load: equal outputs.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

gguf = pytest.importorskip("gguf")

from chronoedit import ChronoEditTransformer3DModel  # noqa: E402
from chronoedit.errors import UserError  # noqa: E402
from chronoedit.keymap import ours_to_original  # noqa: E402
from chronoedit.loading import load_transformer  # noqa: E402
from chronoedit.lora import LoraModule, fuse_lora, load_lora, save_lora, unload_lora  # noqa: E402
from chronoedit.memory import module_bytes  # noqa: E402
from chronoedit.quant import (  # noqa: E402
    GGML_SIZES,
    QTensor,
    QuantizedLinear,
    quantize_model_linears,
    quantized_linears,
)

T = gguf.GGMLQuantizationType
# Forward relative error bounds per type (measured values in the module docstring).
FORWARD_TOL = {
    "Q8_0": 0.01,
    "Q6_K": 0.033,
    "Q5_K": 0.072,
    "Q5_0": 0.066,
    "Q5_1": 0.068,
    "Q4_K": 0.122,
    "Q4_0": 0.146,
    "Q4_1": 0.14,
}
FP8_TOL = {"F8_E4M3": 0.055, "F8_E5M2": 0.1}
NUMPY_QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# Byte offsets of the fp16 scales in each block type (random bytes there could be inf/NaN).
F16_OFFSETS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


# ------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def reference(tiny_ckpt_hd128) -> ChronoEditTransformer3DModel:
    return ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt_hd128, subfolder="transformer")


def forward(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=gen)
    text, clip = torch.randn(1, 512, cfg.text_dim, generator=gen), torch.randn(1, 257, cfg.image_dim, generator=gen)
    with torch.no_grad():
        return model(x.to(dtype), torch.tensor([400]), text.to(dtype), clip.to(dtype)).sample.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def linear_weight_names(model: torch.nn.Module) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """[n] -> [n, 2] uint8 little-endian halves."""
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _nonzero(values: np.ndarray) -> np.ndarray:
    return np.where(values == 0, 1, values)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Reference Q6_K packer: [rows, cols] (cols % 256 == 0) -> [rows, cols / 256 * 210] uint8."""
    groups = x.astype(np.float32).reshape(-1, 16, 16)  # [n super-blocks, 16 groups, 16 values]
    n = len(groups)
    group_scale = np.abs(groups).max(-1) / 31
    d = (group_scale.max(-1) / 127).astype(np.float16).astype(np.float32)  # [n]
    sc = np.clip(np.round(group_scale / _nonzero(d)[:, None]), -128, 127).astype(np.int8)  # [n, 16]
    step = _nonzero(d[:, None] * sc.astype(np.float32))[..., None]
    q = (np.clip(np.round(groups / step), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)  # halves of 128
    low, high = q & 0x0F, q >> 4
    ql = low[:, :, :64] | (low[:, :, 64:] << 4)  # byte l: value l (low nibble), value l + 64 (high nibble)
    hi = high.reshape(n, 2, 4, 32)  # bits 2k of byte l: value l + 32k
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1)
    return out.reshape(x.shape[0], -1)


def quantize_q45_k(x: np.ndarray, bits: int) -> np.ndarray:
    """Reference Q4_K (bits 4) / Q5_K (bits 5) packer: 8 sub-blocks of 32 with 6-bit scales and minima."""
    sub = x.astype(np.float32).reshape(-1, 8, 32)
    n, levels = len(sub), (1 << bits) - 1
    low = np.minimum(sub.min(-1), 0)
    scale, mins = (sub.max(-1) - low) / levels, -low  # [n, 8]
    d = (scale.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (mins.max(-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / _nonzero(d)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(mins / _nonzero(dmin)[:, None]), 0, 63).astype(np.uint8)
    step, offset = _nonzero(d[:, None] * sc)[..., None], (dmin[:, None] * mn)[..., None]
    q = np.clip(np.round((sub + offset) / step), 0, levels).astype(np.uint8)  # [n, 8, 32]
    scales = np.concatenate(
        [sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6), (sc[:, 4:] & 15) | (mn[:, 4:] << 4)],
        axis=1,
    )
    nibbles = q & 0x0F
    parts = [_f16_bytes(d), _f16_bytes(dmin), scales]
    if bits == 5:
        parts.append(((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8))  # [n, 32]
    parts.append((nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).reshape(n, 128))  # chunk c: sub-blocks 2c, 2c+1
    return np.concatenate(parts, axis=1).reshape(x.shape[0], -1)


K_PACKERS = {"Q4_K": lambda a: quantize_q45_k(a, 4), "Q5_K": lambda a: quantize_q45_k(a, 5), "Q6_K": quantize_q6_k}


def encode(array: np.ndarray, qtype: str) -> tuple[np.ndarray, T | None]:
    """A Linear weight in ``qtype``; rows that are not whole blocks stay F16 (as city96's converter does)."""
    block, _ = GGML_SIZES[qtype]
    if array.shape[-1] % block:
        return array.astype(np.float16), None
    if qtype in K_PACKERS:
        return K_PACKERS[qtype](array), T[qtype]
    return gguf.quants.quantize(array, T[qtype]), T[qtype]


def write_gguf(path: Path, model: torch.nn.Module, qtype: str, original: bool = True, prefix: str = "") -> Path:
    """The model as a city96-style GGUF: Linear weights in ``qtype``, 1-D tensors and tables F32, the 5-D patch
    embedding flattened to F16 with ``comfy.gguf.orig_shape``."""
    writer = gguf.GGUFWriter(str(path), arch="wan")
    linears = set(linear_weight_names(model))
    for key, value in model.state_dict().items():
        name = prefix + (ours_to_original(key) if original else key)
        array = value.detach().float().numpy()
        if key in linears:
            data, raw = encode(array, qtype)
            writer.add_tensor(name, data, raw_dtype=raw)
        elif array.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(array.shape))
            writer.add_tensor(name, array.reshape(array.shape[0], -1).astype(np.float16))
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_fp8(
    path: Path, model: torch.nn.Module, scaled: bool = True, dtype: torch.dtype = torch.float8_e4m3fn
) -> Path:
    """ComfyUI fp8 file (original names): Linear weights in fp8 (``fp8_scaled``: / scale, ``.scale_weight``)."""
    tensors: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=dtype)} if scaled else {}
    linears = set(linear_weight_names(model))
    for key, value in model.state_dict().items():
        name = ours_to_original(key)
        if key in linears:
            scale = value.abs().max() / torch.finfo(dtype).max if scaled else torch.tensor(1.0)
            tensors[name] = (value / scale).to(dtype)
            if scaled:
                tensors[name.rsplit(".", 1)[0] + ".scale_weight"] = scale.reshape(1)
        else:
            tensors[name] = value.clone().contiguous()
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def q8_file(reference, tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "chronoedit-Q8_0.gguf", reference, "Q8_0")


@pytest.fixture(scope="module")
def fp8_file(reference, tmp_path_factory) -> Path:
    return write_fp8(tmp_path_factory.mktemp("fp8") / "chronoedit_fp8_scaled.safetensors", reference)


def random_blocks(qtype: str, n: int, seed: int) -> np.ndarray:
    """[n, bytes per block] random bytes with finite fp16 scales."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, GGML_SIZES[qtype][1]), dtype=np.uint8)
    for offset in F16_OFFSETS[qtype]:
        raw[:, offset : offset + 2] = _f16_bytes(rng.standard_normal(n) * 0.01)
    return raw


# -------------------------------------------------------------------------------------- dequantization vs the oracle
@pytest.mark.parametrize("qtype", list(F16_OFFSETS))
def test_block_dequant_equals_gguf_reference_on_random_blocks(qtype):
    block, size = GGML_SIZES[qtype]
    raw = random_blocks(qtype, 48, seed=len(qtype) + size).reshape(3, -1)  # 3 rows of 16 blocks
    expected = gguf.quants.dequantize(raw, T[qtype])
    ours = QTensor(qtype, torch.from_numpy(raw.copy()), expected.shape).dequantize()
    assert ours.shape == (3, 16 * block)
    assert np.array_equal(ours.numpy(), expected)


@pytest.mark.parametrize("qtype", [*NUMPY_QUANTIZABLE, "BF16", "F16"])
def test_dequant_of_numpy_quantized_weights_equals_reference(qtype):
    weights = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    packed = gguf.quants.quantize(weights, T[qtype])
    expected = gguf.quants.dequantize(packed, T[qtype])
    ours = QTensor(qtype, torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8).copy()), (8, 512)).dequantize()
    assert np.array_equal(ours.numpy(), expected)


@pytest.mark.parametrize(("qtype", "bound"), [("Q4_K", 0.08), ("Q5_K", 0.04), ("Q6_K", 0.02)])
def test_reference_k_packers_round_trip(qtype, bound):
    """The test-side K-quant packers produce blocks the oracle reads back close to the input; ours equals it."""
    weights = np.random.default_rng(2).standard_normal((4, 1024)).astype(np.float32)
    packed = K_PACKERS[qtype](weights)
    expected = gguf.quants.dequantize(packed, T[qtype])
    assert np.linalg.norm(expected - weights) / np.linalg.norm(weights) < bound
    assert np.array_equal(QTensor(qtype, torch.from_numpy(packed), (4, 1024)).dequantize().numpy(), expected)


# ----------------------------------------------------------------------------------------------------- GGUF models
@pytest.mark.parametrize("qtype", list(FORWARD_TOL))
def test_gguf_model_kept_quantized_matches_fp32_within_tolerance(reference, tmp_path, qtype):
    path = write_gguf(tmp_path / f"chronoedit-{qtype}.gguf", reference, qtype)
    model = load_transformer(path)
    assert model.config == reference.config  # inferred from the shapes (orig_shape for the 5-D patch embedding)
    layers = quantized_linears(model)
    assert layers["blocks.0.attn1.to_q"].qtype == qtype
    assert isinstance(model.blocks[0].attn1.to_q, torch.nn.Linear)
    assert not any(isinstance(p, QTensor) for p in model.parameters())
    out, ref_out = forward(model), forward(reference)
    assert rel(out, ref_out) < FORWARD_TOL[qtype], rel(out, ref_out)
    assert rel(out, ref_out) > 0
    dense = load_transformer(path, quantized="dequantize")
    assert not quantized_linears(dense)
    assert torch.equal(forward(dense), out)  # the same math, only when the weights are dequantized differs


def test_gguf_names_prefix_and_bf16(reference, q8_file, tmp_path):
    """Diffusers names and ComfyUI's prefix load too; a bf16 model dequantizes to bf16 per layer."""
    ours_names = load_transformer(write_gguf(tmp_path / "ours.gguf", reference, "Q8_0", original=False))
    prefixed = load_transformer(write_gguf(tmp_path / "pre.gguf", reference, "Q8_0", prefix="model.diffusion_model."))
    plain = load_transformer(q8_file)
    assert torch.equal(forward(ours_names), forward(plain))
    assert torch.equal(forward(prefixed), forward(plain))
    bf16 = load_transformer(q8_file, torch_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert bf16.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32  # fp32 island stays fp32
    dense_bf16 = load_transformer(q8_file, torch_dtype=torch.bfloat16, quantized="dequantize")
    assert torch.equal(forward(bf16, torch.bfloat16), forward(dense_bf16, torch.bfloat16))


def test_gguf_keeps_linear_weights_small(reference, q8_file):
    model = load_transformer(q8_file)
    layers = quantized_linears(model).values()
    stored = sum(layer.weight_nbytes for layer in layers)
    fp32 = sum(layer.in_features * layer.out_features * 4 for layer in layers)
    assert stored / fp32 == pytest.approx(34 / 32 / 4)  # Q8_0: 34 bytes per 32 values
    assert module_bytes(model) < 0.45 * module_bytes(reference)


# ------------------------------------------------------------------------------------------------------------- fp8
@pytest.mark.parametrize(
    ("scaled", "dtype", "qtype"),
    [
        (True, torch.float8_e4m3fn, "F8_E4M3"),
        (False, torch.float8_e4m3fn, "F8_E4M3"),
        (True, torch.float8_e5m2, "F8_E5M2"),
    ],
    ids=["fp8_scaled", "fp8_e4m3fn", "fp8_e5m2_scaled"],
)
def test_fp8_kept_quantized_is_the_same_math_as_dequantize_at_load(reference, tmp_path, scaled, dtype, qtype):
    path = write_fp8(tmp_path / "fp8.safetensors", reference, scaled=scaled, dtype=dtype)
    model = load_transformer(path)
    layer = model.blocks[0].attn1.to_q
    assert isinstance(layer, QuantizedLinear) and layer.qtype == qtype
    assert layer.qdata.dtype == torch.uint8 and layer.weight.dtype == torch.float32
    assert (layer.qscale is not None) == scaled
    assert torch.equal(forward(model), forward(load_transformer(path, quantized="dequantize")))
    assert 0 < rel(forward(model), forward(reference)) < FP8_TOL[qtype]
    for dtype in (torch.bfloat16, torch.float16):
        kept = load_transformer(path, torch_dtype=dtype)
        dense = load_transformer(path, torch_dtype=dtype, quantized="dequantize")
        assert torch.equal(forward(kept, dtype), forward(dense, dtype))


def test_fp8_linear_weights_take_a_quarter_of_fp32(fp8_file):
    model = load_transformer(fp8_file)
    layers = quantized_linears(model)
    assert set(layers) == {name.rsplit(".", 1)[0] for name in linear_weight_names(model)}
    stored = sum(layer.weight_nbytes for layer in layers.values())
    fp32 = sum(layer.in_features * layer.out_features * 4 for layer in layers.values())
    assert 0.25 <= stored / fp32 < 0.251  # 1 byte per value + one fp32 scale per layer


def test_casting_a_quantized_model_keeps_the_bytes(fp8_file):
    model = load_transformer(fp8_file)
    layer = model.blocks[0].attn1.to_q
    before, weight = forward(model), layer.weight.clone()
    model.to(torch.bfloat16)
    assert layer.qdata.dtype == torch.uint8 and layer.compute_dtype == torch.bfloat16
    assert model.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert rel(forward(model, torch.bfloat16), before) < 0.02
    model.float()
    assert torch.equal(layer.weight, weight)  # the fp8 bytes and the fp32 scale were never cast


# ------------------------------------------------------------------------------------------------------------ LoRA
def random_lora(model: torch.nn.Module, seed: int = 5) -> dict[str, LoraModule]:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(len(model.blocks)):
        for target in ("attn1.to_q", "attn1.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"):
            out_dim, in_dim = model.get_submodule(f"blocks.{i}.{target}").weight.shape
            down, up = 0.1 * torch.randn(4, in_dim, generator=gen), 0.1 * torch.randn(out_dim, 4, generator=gen)
            modules[f"blocks.{i}.{target}"] = LoraModule(down=down, up=up, alpha=8.0)
    return modules


@pytest.mark.parametrize(("kind", "bound"), [("Q8_0", 0.01), ("fp8", 0.045)])  # measured 0.74%, 3.2%
def test_lora_unfused_on_a_quantized_model(reference, q8_file, fp8_file, tmp_path, kind, bound):
    """A LoRA file (written with save_lora) changes the quantized model's output as it changes the fp32 model's."""
    lora = save_lora(random_lora(reference), tmp_path / "lora.safetensors")
    with_lora = copy.deepcopy(reference)
    load_lora(with_lora, lora)
    expected_delta = forward(with_lora) - forward(reference)
    path = q8_file if kind == "Q8_0" else fp8_file
    model, dense = load_transformer(path), load_transformer(path, quantized="dequantize")
    base_out = forward(model)
    load_lora(model, lora, scale=1.0)
    load_lora(dense, lora, scale=1.0)
    assert isinstance(model.blocks[0].attn1.to_q.get_base_layer(), QuantizedLinear)
    out = forward(model)
    assert rel(out - base_out, expected_delta) < bound, rel(out - base_out, expected_delta)
    assert rel(expected_delta, forward(reference)) > 0.05  # the LoRA really changes the output
    assert torch.equal(out, forward(dense))  # unfused LoRA on quantized = on the same weights dequantized at load
    with pytest.raises(ValueError, match=r"cannot fuse a LoRA into quantized weights \(blocks\..*\); use it unfused"):
        fuse_lora(model)
    assert torch.equal(forward(model), out)  # nothing was half-merged
    unload_lora(model)
    assert isinstance(model.blocks[0].attn1.to_q, QuantizedLinear)
    assert torch.equal(forward(model), base_out)


def test_full_weight_delta_on_a_quantized_linear_fails_loudly(q8_file):
    """A ``.diff`` (full weight delta) cannot be added to quantized weights: an error, never silently ignored."""
    model = load_transformer(q8_file)
    weight = model.blocks[0].attn1.to_q.weight
    with pytest.raises(ValueError, match="read-only"):  # chronoedit.lora's error
        load_lora(model, {"diffusion_model.blocks.0.self_attn.q.diff": torch.zeros(weight.shape)})


# ----------------------------------------------------------------------------------------------- QuantizedLinear
def test_quantized_linear_is_a_linear_with_a_read_only_weight():
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(8, 64, bias=False))
    dense = torch.randn(8, 64, generator=gen)
    packed = gguf.quants.quantize(dense.numpy(), T.Q8_0)
    qweight = QTensor("Q8_0", torch.from_numpy(packed.copy()).reshape(-1, 34), (8, 64))
    fp16 = QTensor("F16", dense.T.contiguous().half().view(torch.uint8).reshape(-1, 2), (64, 8))
    assert quantize_model_linears(model, {"0.weight": qweight, "1.weight": fp16}) == ["0", "1"]
    model[0]._parameters["bias"] = torch.nn.Parameter(torch.zeros(8), requires_grad=False)
    layer = model[0]
    assert isinstance(layer, torch.nn.Linear) and layer.weight.shape == (8, 64)
    x = torch.randn(3, 64, generator=gen)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, qweight.dequantize(), layer.bias))
    assert rel(layer.weight, dense) < 0.01
    for change in (lambda w: w.add_(1), lambda w: w.copy_(w), lambda w: w.data.add_(1), lambda w: w.zero_()):
        with pytest.raises(UserError, match="cannot fuse a LoRA into quantized weights"):
            change(layer.weight)

    def set_data(w: torch.Tensor) -> None:
        w.data = torch.zeros(8, 64)

    with pytest.raises(UserError, match="read-only"):
        set_data(layer.weight)
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert torch.equal(layer.state_dict()["weight"], qweight.dequantize())
    assert "qtype=Q8_0" in repr(layer)


def test_quantize_model_linears_keeps_the_islands_the_caller_names():
    """The quant package knows no model: which layers compute in float32 is the caller's ``keep_fp32``."""
    from chronoedit.model.transformer import keeps_fp32

    with torch.device("meta"):
        model = torch.nn.ModuleDict({"time_embedder": torch.nn.Linear(32, 8), "to_q": torch.nn.Linear(32, 8)})
    packed = gguf.quants.quantize(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)).numpy(), T.Q8_0)

    def weights() -> dict[str, QTensor]:
        return {name: QTensor("Q8_0", torch.from_numpy(packed.copy()).reshape(-1, 34), (8, 32)) for name in model}

    quantize_model_linears(model, weights(), torch.bfloat16, keep_fp32=keeps_fp32)
    assert (model["time_embedder"].compute_dtype, model["to_q"].compute_dtype) == (torch.float32, torch.bfloat16)
    with torch.device("meta"):
        model = torch.nn.ModuleDict({"time_embedder": torch.nn.Linear(32, 8), "to_q": torch.nn.Linear(32, 8)})
    quantize_model_linears(model, weights(), torch.bfloat16)  # no rule given: every layer in the given dtype
    assert model["time_embedder"].compute_dtype == torch.bfloat16


def test_quantized_mode_is_checked(q8_file):
    with pytest.raises(UserError, match="quantized must be one of"):
        load_transformer(q8_file, quantized="fp8")


# ---------------------------------------------------------------------------------------------------- bad files
def _patch_first_tensor_type(source: Path, target: Path, qtype: int) -> Path:
    """Copy ``source`` with the first Q8_0 tensor's type id in the header set to ``qtype``."""
    data = bytearray(source.read_bytes())
    reader = gguf.GGUFReader(source)
    info = next(t for t in reader.tensors if t.tensor_type == T.Q8_0).field
    name_len = struct.unpack_from("<Q", data, info.offset)[0]
    pos = info.offset + 8 + name_len
    pos += 4 + 8 * struct.unpack_from("<I", data, pos)[0]  # n_dims, dims
    assert struct.unpack_from("<I", data, pos)[0] == T.Q8_0
    struct.pack_into("<I", data, pos, qtype)
    target.write_bytes(bytes(data))
    return target


def _unsupported_type_file(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), arch="wan")
    writer.add_tensor("blocks.0.self_attn.q.weight", np.zeros((256, 8 * 18), dtype=np.uint8), raw_dtype=T.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown_type", "unknown tensor quantization type"),
        ("unsupported_type", r"tensor 'blocks\.0\.self_attn\.q\.weight' has quantization type IQ4_NL"),
        ("truncated", "truncated"),
        ("cut_in_header", "truncated or corrupt"),
        ("empty", "empty file"),
        ("not_gguf", "not a GGUF file"),
    ],
)
def test_bad_gguf_files_give_one_line_errors_naming_the_file(q8_file, tmp_path, case, message):
    path = tmp_path / f"{case}.gguf"
    data = q8_file.read_bytes()
    if case == "unknown_type":
        _patch_first_tensor_type(q8_file, path, 99)
    elif case == "unsupported_type":
        _unsupported_type_file(path)
    elif case == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif case == "cut_in_header":
        path.write_bytes(data[:300])
    elif case == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 20)
    with pytest.raises(UserError, match=message) as info:
        load_transformer(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
