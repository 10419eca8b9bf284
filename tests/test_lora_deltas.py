"""Exact LoRA deltas (``diff_b`` bias deltas, ``diff`` weight / parameter deltas of Wan-layout files) belong to the
adapter, like the low-rank pairs: added at forward time at the adapter's scale, never written into the base
parameters while unfused. ``transformer.state_dict()`` keeps the original base weights after unfuse, disable and
unload; fusing writes them in and gives the unfused output; parity with diffusers' loader (which turns ``diff_b``
into peft ``lora_B`` biases) holds through scales, disable and fuse.

Tolerances: while unfused (and disabled or unloaded without a fuse before) the base weights are bit-identical; after
a fuse and an unfuse within 1e-6 (measured 3e-8 to 4.5e-8: peft subtracts the low-rank product it added, the exact
deltas are restored from copies); fused vs unfused output within 1e-4 (fp32, measured 4.8e-7).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_lora import TOL, Modules, by_hand, diffusers_pipe, forward, max_diff, random_lora, save, write_wan

from chronoedit import ChronoEditPipeline, ChronoEditTransformer3DModel
from chronoedit.lora import LoraModule, list_adapters, load_lora, set_adapters, unload_lora
from chronoedit.quant import QuantizedLinear, from_fp8, replace_linear

BASE_TOL = 1e-6  # base weights after a change of the adapter state
FUSED_TOL = 1e-4  # fused vs unfused output


# ------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def base(tiny_ckpt: Path) -> ChronoEditTransformer3DModel:
    return ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt, subfolder="transformer")


def every_delta(model: torch.nn.Module, seed: int) -> Modules:
    """Pairs on every target of every block (random_lora) with a diff_b on each of them, plus every other kind of
    exact delta: norms (diff, diff_b), block and top-level modulation tables, a conv (patch embedding), a linear
    without pairs (time projection), the head (diff + diff_b) and add_k_proj (random_lora's extras)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    modules = random_lora(model, seed, extras=True)
    for m in modules.values():
        if m.down is not None and m.diff_b is None:
            m.diff_b = 0.1 * torch.randn(m.up.shape[0], generator=gen)
    for name in ("patch_embedding", "proj_out"):
        layer = model.get_submodule(name)
        modules[name] = LoraModule(diff=0.1 * torch.randn(*layer.weight.shape, generator=gen))
        modules[name].diff_b = 0.1 * torch.randn(*layer.bias.shape, generator=gen)
    time_proj = model.get_submodule("condition_embedder.time_proj")
    modules["condition_embedder.time_proj"] = LoraModule(diff_b=0.1 * torch.randn(time_proj.bias.shape, generator=gen))
    modules["scale_shift_table"] = LoraModule(diff=0.1 * torch.randn(*model.scale_shift_table.shape, generator=gen))
    return modules


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base tensors of ``transformer.state_dict()``: peft's ``lora_A``/``lora_B`` left out, its
    ``.base_layer.`` taken out of the names."""
    return {
        k.replace(".base_layer.", "."): v.detach().clone()
        for k, v in model.state_dict().items()
        if ".lora_A." not in k and ".lora_B." not in k
    }


def base_diff(model: torch.nn.Module, original: dict[str, torch.Tensor]) -> float:
    """Largest difference of any base tensor from the original (the same names are required)."""
    now = base_state(model)
    assert now.keys() == original.keys()
    return max(max_diff(v, original[k]) for k, v in now.items())


@dataclass
class Loaded:
    pipe: ChronoEditPipeline
    a: Modules
    b: Modules
    plain: torch.Tensor  # the output of this very model before loading (a copy's may differ in the last bit)


@pytest.fixture
def loaded(base, tmp_path) -> Loaded:
    """A pipeline with two Wan-layout adapters full of exact deltas, ``a`` at 0.8 and ``b`` at 0.3."""
    pipe = ChronoEditPipeline(None, None, None, None, copy.deepcopy(base), None, None)
    plain = forward(pipe.transformer)
    a, b = every_delta(base, seed=31), every_delta(base, seed=32)
    pipe.load_lora_weights(save(write_wan(a), tmp_path / "a.safetensors"), "a", scale=0.8)
    pipe.load_lora_weights(save(write_wan(b), tmp_path / "b.safetensors"), "b", scale=0.3)
    return Loaded(pipe, a, b, plain)


# --------------------------------------------------------------------------------------- base weights stay original
def test_loaded_adapters_leave_the_base_weights_alone(base, loaded):
    pipe, a, b = loaded.pipe, loaded.a, loaded.b
    original = base_state(base)
    assert base_diff(pipe.transformer, original) == 0.0  # bit-identical while unfused
    bias = pipe.transformer.blocks[1].ffn.net[2].base_layer.bias
    assert type(bias) is torch.nn.Parameter and torch.equal(bias, base.blocks[1].ffn.net[2].bias)
    expected = forward(by_hand(base, (a, 0.8), (b, 0.3)))
    assert max_diff(expected, loaded.plain) > 1e-2  # the deltas really change the output
    assert max_diff(forward(pipe.transformer), expected) <= TOL
    assert base_diff(pipe.transformer, original) == 0.0  # and after a forward


def test_unfuse_gives_back_the_original_base_weights(base, loaded):
    pipe = loaded.pipe
    original, unfused = base_state(base), forward(pipe.transformer)
    pipe.fuse_lora()
    fused_bias = pipe.transformer.blocks[1].ffn.net[2].base_layer.bias
    assert max_diff(fused_bias, base.blocks[1].ffn.net[2].bias) > 1e-2  # fusing writes the diff_b in
    assert max_diff(pipe.transformer.scale_shift_table, base.scale_shift_table) > 1e-2  # and the diffs
    pipe.unfuse_lora()
    assert base_diff(pipe.transformer, original) <= BASE_TOL
    assert max_diff(forward(pipe.transformer), unfused) <= TOL  # unfused, the adapters still apply


def test_disable_leaves_the_original_base_weights(base, loaded):
    pipe, plain, original = loaded.pipe, loaded.plain, base_state(base)
    pipe.disable_lora()
    assert base_diff(pipe.transformer, original) == 0.0 and torch.equal(forward(pipe.transformer), plain)
    pipe.enable_lora()
    pipe.fuse_lora()
    pipe.disable_lora()  # from fused: unfused first
    assert pipe.get_active_adapters() == []
    assert base_diff(pipe.transformer, original) <= BASE_TOL
    assert max_diff(forward(pipe.transformer), plain) <= TOL


def test_unload_leaves_the_original_base_weights(base, loaded):
    pipe = loaded.pipe
    original, reference = base_state(base), base.state_dict()
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    model = pipe.transformer
    assert model.state_dict().keys() == reference.keys()  # no peft tensors, no delta buffers left
    assert base_diff(model, original) <= BASE_TOL
    assert not any(name.startswith("lora_delta_") for name, _ in model.named_buffers())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert max_diff(forward(model), loaded.plain) <= TOL  # fused then unfused: peft's subtraction rounds


def test_fused_output_equals_unfused(base, loaded):
    pipe, b = loaded.pipe, loaded.b
    unfused = forward(pipe.transformer)
    pipe.fuse_lora()
    assert max_diff(forward(pipe.transformer), unfused) <= FUSED_TOL
    pipe.set_adapters(["b"], [1.3])  # unfuses, then b alone
    only_b = forward(pipe.transformer)
    assert max_diff(only_b, forward(by_hand(base, (b, 1.3)))) <= TOL
    pipe.fuse_lora()
    assert max_diff(forward(pipe.transformer), only_b) <= FUSED_TOL


# ------------------------------------------------------------------------------------------ scales and switching
def test_deltas_follow_scales_and_set_adapters(base, loaded):
    pipe, a, b = loaded.pipe, loaded.a, loaded.b
    original = base_state(base)
    for names, scales in ((["a"], [0.5]), (["b", "a"], [2.0, -1.0]), (["b"], [0.25]), (["a", "b"], [1.0, 1.0])):
        pipe.set_adapters(names, scales)
        expected = forward(by_hand(base, *[((a, b)[n == "b"], s) for n, s in zip(names, scales, strict=True)]))
        assert max_diff(forward(pipe.transformer), expected) <= TOL
        assert base_diff(pipe.transformer, original) == 0.0


def test_a_lora_of_deltas_only(base, tmp_path):
    """No low-rank pair at all (no peft layer): the deltas still apply, fuse and unfuse like an adapter."""
    model = copy.deepcopy(base)
    original, plain = base_state(base), forward(model)
    deltas = {k: LoraModule(diff=m.diff, diff_b=m.diff_b) for k, m in every_delta(base, seed=33).items()}
    deltas = {k: m for k, m in deltas.items() if m.diff is not None or m.diff_b is not None}
    load_lora(model, save(write_wan(deltas), tmp_path / "d.safetensors"), "d", scale=0.6)
    expected = forward(by_hand(base, (deltas, 0.6)))
    assert max_diff(expected, plain) > 1e-2 and max_diff(forward(model), expected) <= TOL
    assert base_diff(model, original) == 0.0
    pipe = ChronoEditPipeline(None, None, None, None, model, None, None)
    pipe.fuse_lora()
    assert max_diff(forward(model), expected) <= FUSED_TOL
    pipe.unfuse_lora()
    assert base_diff(model, original) <= BASE_TOL
    pipe.unload_lora_weights()
    assert base_diff(model, original) <= BASE_TOL and torch.equal(forward(model), plain)


def test_a_failing_forward_puts_the_original_parameters_back(base, tmp_path):
    model = copy.deepcopy(base)
    load_lora(model, save(write_wan(every_delta(base, seed=34)), tmp_path / "e.safetensors"))
    block = model.blocks[0]
    with pytest.raises(Exception):  # noqa: B017 - any error of the block's own forward
        block(torch.zeros(1, 3, 7), None, None, None)
    assert type(block.scale_shift_table) is torch.nn.Parameter
    assert torch.equal(block.scale_shift_table, base.blocks[0].scale_shift_table)


def test_a_deep_copy_carries_its_own_adapters(base, tmp_path):
    """The hooks and delta buffers are copied with the model: unloading the copy leaves the original's adapters."""
    model = copy.deepcopy(base)
    lora = every_delta(base, seed=35)
    load_lora(model, save(write_wan(lora), tmp_path / "c.safetensors"), scale=0.7)
    twin = copy.deepcopy(model)
    unload_lora(twin)
    assert max_diff(forward(twin), forward(base)) <= TOL and list_adapters(twin) == []
    assert not any(m._forward_pre_hooks for m in twin.modules()) and list_adapters(model) == ["c"]
    assert max_diff(forward(model), forward(by_hand(base, (lora, 0.7)))) <= TOL


# --------------------------------------------------------------------------------------------- quantized layers
def quantize(model: torch.nn.Module, names: list[str]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``model`` with these linears fp8-quantized (per-row scales), and a dense twin holding the same weights
    dequantized."""
    quantized, dense = copy.deepcopy(model), copy.deepcopy(model)
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True) / 448.0
        layer = replace_linear(quantized, f"{name}.weight", from_fp8((weight / scale).to(torch.float8_e4m3fn), scale))
        with torch.no_grad():
            dense.get_submodule(name).weight.copy_(layer.dequantized_weight())
    return quantized, dense


def test_diff_b_on_quantized_layers(base, tmp_path):
    """Pairs + diff_b on quantized to_q, diff_b alone on quantized ffn.net.2: applied unfused as on the dequantized
    weights, the quantized layers' biases untouched; fusing diff_b alone into a quantized layer's bias works."""
    names = [f"blocks.{i}.{t}" for i in range(len(base.blocks)) for t in ("attn1.to_q", "ffn.net.2")]
    qmodel, dense = quantize(base, names)
    original, plain = base_state(qmodel), forward(qmodel)
    lora = {k: m for k, m in every_delta(base, seed=36).items() if k.endswith(("attn1.to_q", "ffn.net.2"))}
    for name in [k for k in lora if k.endswith("ffn.net.2")]:
        lora[name] = LoraModule(diff_b=lora[name].diff_b)  # no pair: no peft layer, only the bias delta
    path = save(write_wan(lora), tmp_path / "q.safetensors")
    load_lora(qmodel, path, scale=0.9)
    load_lora(dense, path, scale=0.9)
    assert isinstance(qmodel.blocks[0].ffn.net[2], QuantizedLinear)
    assert max_diff(forward(qmodel), forward(dense)) <= TOL and max_diff(forward(qmodel), plain) > 1e-2
    assert base_diff(qmodel, original) == 0.0
    with pytest.raises(ValueError, match="cannot fuse a LoRA into quantized weights"):  # pairs on quantized to_q
        ChronoEditPipeline(None, None, None, None, qmodel, None, None).fuse_lora()
    assert max_diff(forward(qmodel), forward(dense)) <= TOL  # nothing half-fused
    unload_lora(qmodel)
    assert base_diff(qmodel, original) == 0.0 and torch.equal(forward(qmodel), plain)
    only_b = {k: m for k, m in lora.items() if m.down is None}
    load_lora(qmodel, write_wan(only_b), "bias", scale=0.9)
    unfused = forward(qmodel)
    pipe = ChronoEditPipeline(None, None, None, None, qmodel, None, None)
    pipe.fuse_lora()  # only biases: allowed on quantized layers
    assert max_diff(forward(qmodel), unfused) <= FUSED_TOL
    pipe.unfuse_lora()
    assert base_diff(qmodel, original) <= BASE_TOL


def test_full_weight_delta_on_a_quantized_layer_is_refused_before_anything_changes(base):
    qmodel, _ = quantize(base, ["blocks.0.attn1.to_q"])
    original = base_state(qmodel)
    lora = {"blocks.0.attn1.to_q": LoraModule(diff=torch.ones(32, 32), diff_b=torch.ones(32))}
    with pytest.raises(ValueError, match=r"blocks\.0\.attn1\.to_q\.weight is read-only .*'diffusion_model"):
        load_lora(qmodel, write_wan(lora))
    assert list_adapters(qmodel) == [] and base_diff(qmodel, original) == 0.0
    assert not any(m._forward_pre_hooks for m in qmodel.modules())


# ---------------------------------------------------------------------------------- parity with diffusers' loader
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_diff_b_scales_disables_and_fuses_as_in_diffusers(tiny_ckpt_hd128, tmp_path):
    """diffusers loads ``diff_b`` as peft ``lora_B`` biases: scaled with the adapter, off when disabled, merged on
    fuse. Ours matches it at each step, and our base weights stay the originals while unfused."""
    ours = ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt_hd128, subfolder="transformer")
    plain_model, original = copy.deepcopy(ours), base_state(ours)
    lora, gen = random_lora(ours, seed=37), torch.Generator().manual_seed(38)
    for module in lora.values():
        module.diff_b = 0.1 * torch.randn(module.up.shape[0], generator=gen)
    path = save(write_wan(lora), tmp_path / "b.safetensors")
    ref = diffusers_pipe(tiny_ckpt_hd128)
    pipe = ChronoEditPipeline(None, None, None, None, ours, None, None)
    ref.load_lora_weights(str(path), adapter_name="b")
    pipe.load_lora_weights(path, "b")
    for weight in (0.5, 1.7):
        ref.set_adapters(["b"], adapter_weights=[weight])
        set_adapters(ours, ["b"], [weight])
        assert max_diff(forward(ours), forward(ref.transformer)) <= TOL
        assert max_diff(forward(ours), forward(by_hand(plain_model, (lora, weight)))) <= TOL
    assert base_diff(ours, original) == 0.0
    ref.fuse_lora()
    pipe.fuse_lora()
    assert max_diff(forward(ours), forward(ref.transformer)) <= FUSED_TOL
    ref.unfuse_lora()
    pipe.unfuse_lora()
    ref.disable_lora()
    pipe.disable_lora()
    assert max_diff(forward(ours), forward(ref.transformer)) <= TOL
    assert base_diff(ours, original) <= BASE_TOL

