"""LoRA: every layout in the wild read into one form and attached with peft (several adapters, each with its scale),
disabled, fused, unloaded; parity with diffusers' own LoRA loading; one clear error per bad file.

The expected output of a LoRA is always computed by hand: W + scale·(alpha/r)·up@down, bias + scale·diff_b,
weight + scale·diff on a copy of the model. The foreign layouts are written here, independently of the library.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from chronoedit import ChronoEditPipeline, ChronoEditTransformer3DModel
from chronoedit.keymap import ours_to_original
from chronoedit.lora import (
    LoraModule,
    active_adapters,
    detect_layout,
    disable_lora,
    enable_lora,
    fuse_lora,
    list_adapters,
    load_lora,
    read_lora,
    save_lora,
    set_adapters,
    unfuse_lora,
    unload_lora,
)

TOL = 1e-5  # fp32
TARGETS = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0"))
TARGETS += ("ffn.net.0.proj", "ffn.net.2")
RANK = 4
Modules = dict[str, LoraModule]


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tiny_ckpt) -> ChronoEditTransformer3DModel:
    return ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt, subfolder="transformer")


@pytest.fixture
def model(base) -> ChronoEditTransformer3DModel:
    return copy.deepcopy(base)


def forward(model: torch.nn.Module) -> torch.Tensor:
    """2 latent frames of 4x4 (the temporal-skip case), fixed inputs in the model's dtype."""
    gen = torch.Generator().manual_seed(7)
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=gen)
    text, clip = torch.randn(1, 512, cfg.text_dim, generator=gen), torch.randn(1, 257, cfg.image_dim, generator=gen)
    with torch.no_grad():
        x, text, clip = (t.to(model.dtype) for t in (x, text, clip))
        return model(x, torch.tensor([400]), text, clip, return_dict=False)[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def random_lora(model: torch.nn.Module, seed: int, extras: bool = False) -> Modules:
    """Rank 4 (rank 2 on ffn.net.2: a rank_pattern) with alphas 8 and 3 (an alpha_pattern) on q, k, v, o, ffn.0,
    ffn.2 of both attentions of every block. ``extras``: diff_b on a LoRA'd linear, diff + diff_b on the affine
    cross-attention norm (original norm3), diff on an RMSNorm, on a modulation table and on a whole linear weight."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return 0.1 * torch.randn(*shape, generator=gen)

    modules: Modules = {}
    for i in range(len(model.blocks)):
        for j, target in enumerate(TARGETS):
            out_dim, in_dim = model.get_submodule(f"blocks.{i}.{target}").weight.shape
            rank = 2 if target == "ffn.net.2" else RANK
            alpha = 3.0 if j % 3 == 0 else 8.0
            modules[f"blocks.{i}.{target}"] = LoraModule(down=rand(rank, in_dim), up=rand(out_dim, rank), alpha=alpha)
    if extras:
        dim = model.config.inner_dim
        modules["blocks.0.attn1.to_q"].diff_b = rand(dim)
        modules["blocks.0.norm2"] = LoraModule(diff=rand(dim), diff_b=rand(dim))
        modules["blocks.1.attn2.norm_q"] = LoraModule(diff=rand(dim))
        modules["blocks.0.scale_shift_table"] = LoraModule(diff=rand(1, 6, dim))
        add_k = model.get_submodule("blocks.1.attn2.add_k_proj")
        modules["blocks.1.attn2.add_k_proj"] = LoraModule(diff=rand(*add_k.weight.shape), diff_b=rand(dim))
    return modules


def by_hand(model: torch.nn.Module, *loras: tuple[Modules, float]) -> torch.nn.Module:
    """A copy of ``model`` with each LoRA's delta added to the weights at its scale."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for modules, scale in loras:
            for name, m in modules.items():
                try:
                    weight, bias = out.get_parameter(name), None
                except AttributeError:
                    owner = out.get_submodule(name)
                    weight, bias = owner.weight, getattr(owner, "bias", None)
                if m.down is not None:
                    alpha = m.alpha if m.alpha is not None else m.down.shape[0]
                    weight += scale * alpha / m.down.shape[0] * (m.up @ m.down)
                if m.diff is not None:
                    weight += scale * m.diff
                if m.diff_b is not None:
                    bias += scale * m.diff_b
    return out


# -------------------------------------------------------------------------- writers of every layout (test side)
def write_diffusers(modules: Modules, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    out = {}
    for name, m in modules.items():
        out[f"{prefix}{name}.lora_A.weight"], out[f"{prefix}{name}.lora_B.weight"] = m.down, m.up
        out[f"{prefix}{name}.alpha"] = torch.tensor(m.alpha)
    return out


def write_wan(modules: Modules, down: str = "lora_down", up: str = "lora_up") -> dict[str, torch.Tensor]:
    out = {}
    for name, m in modules.items():
        key = "diffusion_model." + ours_to_original(name)
        if m.down is not None:
            out[f"{key}.{down}.weight"], out[f"{key}.{up}.weight"] = m.down, m.up
            out[f"{key}.alpha"] = torch.tensor(m.alpha)
        for part in ("diff", "diff_b"):
            if getattr(m, part) is not None:
                out[f"{key}.{part}"] = getattr(m, part)
    return out


def write_diffsynth(modules: Modules) -> dict[str, torch.Tensor]:
    """No alpha in DiffSynth files: alpha/r is folded into lora_B."""
    out = {}
    for name, m in modules.items():
        key = ours_to_original(name)
        out[f"{key}.lora_A.default.weight"] = m.down
        out[f"{key}.lora_B.default.weight"] = m.up * (m.alpha / m.down.shape[0])
    return out


def write_musubi(modules: Modules) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in modules.items():
        key = "lora_unet_" + ours_to_original(name).replace(".", "_")
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = m.down, m.up
        out[f"{key}.alpha"] = torch.tensor(m.alpha)
    return out


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


LAYOUT_CASES: dict[str, tuple[Callable[[Modules], dict], str, bool]] = {  # writer, detected layout, extras
    "diffusers": (write_diffusers, "diffusers", False),
    "diffusers-bare-keys": (functools.partial(write_diffusers, prefix=""), "diffusers", False),
    "wan-comfy": (write_wan, "wan", True),
    "wan-lora_A_B": (functools.partial(write_wan, down="lora_A", up="lora_B"), "wan", True),
    "diffsynth": (write_diffsynth, "diffsynth", False),
    "musubi": (write_musubi, "musubi", False),
}


# ----------------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_each_layout_gives_the_hand_applied_delta(case, base, model, tmp_path):
    writer, layout, extras = LAYOUT_CASES[case]
    lora = random_lora(base, seed=1, extras=extras)
    path = save(writer(lora), tmp_path / f"{case}.safetensors")
    assert detect_layout(writer(lora)) == layout and read_lora(path).layout == layout
    name = load_lora(model, path)
    assert name == case and list_adapters(model) == [name]
    out, expected, plain = forward(model), forward(by_hand(base, (lora, 1.0))), forward(base)
    assert max_diff(expected, plain) > 1e-3  # the LoRA really changes the output
    assert max_diff(out, expected) <= TOL


def test_two_adapters_scales_set_adapters_and_disable(base, model, tmp_path):
    plain = forward(model)
    a, b = random_lora(base, seed=2), random_lora(base, seed=3, extras=True)
    name_a = load_lora(model, save(write_diffusers(a), tmp_path / "a.safetensors"), scale=0.8)
    load_lora(model, save(write_wan(b), tmp_path / "b.safetensors"), "style", scale=0.3)
    assert active_adapters(model) == {name_a: 0.8, "style": 0.3}
    assert max_diff(forward(model), forward(by_hand(base, (a, 0.8), (b, 0.3)))) <= TOL
    set_adapters(model, [name_a, "style"], [0.2, 1.0])
    assert max_diff(forward(model), forward(by_hand(base, (a, 0.2), (b, 1.0)))) <= TOL
    set_adapters(model, "style", 0.5)
    only_b = forward(by_hand(base, (b, 0.5)))
    assert max_diff(forward(model), only_b) <= TOL
    disable_lora(model)
    assert active_adapters(model) == {}
    assert torch.equal(forward(model), plain)
    enable_lora(model)
    assert max_diff(forward(model), only_b) <= TOL


def test_fuse_then_unfuse_restores_the_weights(base, model, tmp_path):
    a, b = random_lora(base, seed=4), random_lora(base, seed=5, extras=True)
    load_lora(model, save(write_diffusers(a), tmp_path / "a.safetensors"), scale=0.8)
    load_lora(model, save(write_wan(b), tmp_path / "b.safetensors"), scale=0.3)
    unfused = forward(model)
    fuse_lora(model)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(layer.merged for layer in layers)
    assert not torch.equal(model.blocks[0].attn1.to_q.weight, base.blocks[0].attn1.to_q.weight)
    assert max_diff(forward(model), unfused) <= TOL
    unfuse_lora(model)
    assert not any(layer.merged for layer in layers)
    for target in TARGETS:
        weight = model.get_submodule(f"blocks.1.{target}").weight
        assert max_diff(weight, base.get_submodule(f"blocks.1.{target}").weight) <= 1e-6
    assert max_diff(forward(model), unfused) <= TOL
    fuse_lora(model, ["b"])  # fusing a subset makes it the active set
    assert active_adapters(model) == {"b": 0.3}
    assert max_diff(forward(model), forward(by_hand(base, (b, 0.3)))) <= TOL


def test_unload_restores_the_plain_model(base, model, tmp_path):
    b = random_lora(base, seed=6, extras=True)
    path = save(write_wan(b), tmp_path / "b.safetensors")
    plain = forward(model)
    load_lora(model, path)
    unload_lora(model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules()) and not hasattr(model, "peft_config")
    reference = base.state_dict()
    assert model.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert torch.equal(forward(model), plain)
    load_lora(model, path, scale=0.5)  # loads again after an unload; fused then unloaded: within 1e-6
    fuse_lora(model)
    unload_lora(model)
    assert list_adapters(model) == [] and model.state_dict().keys() == reference.keys()
    assert all(max_diff(v, reference[k]) <= 1e-6 for k, v in model.state_dict().items())


def test_save_lora_round_trips(base, model, tmp_path):
    a, b = random_lora(base, seed=8), random_lora(base, seed=9, extras=True)
    load_lora(model, write_diffusers(a), "a")  # a state dict in memory
    path = save_lora(model, tmp_path / "a.safetensors")
    read = read_lora(path)
    assert read.layout == "diffusers" and read.modules.keys() == a.keys()
    for name, m in a.items():
        assert torch.equal(read.modules[name].down, m.down) and torch.equal(read.modules[name].up, m.up)
        assert read.modules[name].alpha == m.alpha  # through diffusers' lora_adapter_metadata header
    with pytest.raises(ValueError, match="layout='wan'"):
        save_lora(b, tmp_path / "b.safetensors")
    other = copy.deepcopy(base)
    load_lora(other, write_wan(b), "b")
    fresh = copy.deepcopy(base)
    load_lora(fresh, save_lora(other, tmp_path / "b.safetensors", layout="wan"))
    assert torch.equal(forward(fresh), forward(other))


def test_pipeline_methods(base, tmp_path):
    pipe = ChronoEditPipeline(None, None, None, None, copy.deepcopy(base), None, None)
    plain = forward(pipe.transformer)
    a = random_lora(base, seed=10, extras=True)
    folder = tmp_path / "lora"
    folder.mkdir()
    save(write_wan(a), folder / "chronoedit_distill_lora.safetensors")
    assert pipe.load_lora_weights(folder) == "chronoedit_distill_lora"
    assert (
        pipe.load_lora_weights(folder / "chronoedit_distill_lora.safetensors", scale=0.5) == "chronoedit_distill_lora_2"
    )
    assert pipe.get_active_adapters() == ["chronoedit_distill_lora", "chronoedit_distill_lora_2"]
    pipe.set_adapters(["chronoedit_distill_lora"], [0.7])
    expected = forward(by_hand(base, (a, 0.7)))
    assert max_diff(forward(pipe.transformer), expected) <= TOL
    pipe.disable_lora()
    assert pipe.get_active_adapters() == [] and torch.equal(forward(pipe.transformer), plain)
    pipe.enable_lora()
    pipe.fuse_lora()
    assert max_diff(forward(pipe.transformer), expected) <= TOL
    pipe.unfuse_lora()
    pipe.unload_lora_weights()  # fused then unfused: peft subtracts what it added, within float rounding
    assert pipe.get_active_adapters() == [] and max_diff(forward(pipe.transformer), plain) <= TOL
    save(write_wan(a), folder / "second.safetensors")
    with pytest.raises(ValueError, match=r"holds 2 \.safetensors files"):
        pipe.load_lora_weights(folder)


def test_bf16_model_disable_and_unload_are_exact(base):
    """In bf16 the LoRA weights follow the base dtype, fp32 islands keep fp32 diffs; disable and unload (unfused)
    give back the very same weights and output."""
    model = copy.deepcopy(base).cast_to(torch.bfloat16)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    plain = forward(model)
    lora = random_lora(base, seed=15, extras=True)
    load_lora(model, write_wan(lora), scale=0.7)
    assert model.blocks[0].norm2.weight.dtype == torch.float32  # an fp32 island with a diff stays fp32
    out = forward(model)
    expected = forward(by_hand(base, (lora, 0.7)))
    assert max_diff(out.float(), expected) <= 0.02 * expected.abs().max()  # bf16 rounding, the same function
    disable_lora(model)
    assert torch.equal(forward(model), plain)
    enable_lora(model)
    unload_lora(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------- parity with diffusers' loader
@pytest.fixture(scope="module")
def ours_hd128(tiny_ckpt_hd128) -> ChronoEditTransformer3DModel:
    return ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt_hd128, subfolder="transformer")


def diffusers_pipe(ckpt: Path):
    """diffusers' ChronoEditPipeline around its own transformer (the LoRA loader needs nothing else)."""
    import diffusers

    transformer = diffusers.ChronoEditTransformer3DModel.from_pretrained(ckpt, subfolder="transformer").eval()
    return diffusers.ChronoEditPipeline(None, None, None, None, transformer, None, None)


# diffusers' own loader warns about the zero LoRA it adds to the image K/V layers, and about a second adapter
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_parity_with_diffusers_lora_loading(tiny_ckpt_hd128, ours_hd128, tmp_path):
    """The diffusers layout (alpha, rank and alpha patterns in the header) and the Wan layout (alpha, diff_b on
    LoRA'd linears, which diffusers turns into lora_B biases), two adapters at 0.8 and 0.3, then set_adapters."""
    a, b = random_lora(ours_hd128, seed=11), random_lora(ours_hd128, seed=12)
    gen = torch.Generator().manual_seed(15)
    for module in b.values():  # on every LoRA'd linear: diffusers leaves missing lora_B biases on the meta device
        module.diff_b = 0.1 * torch.randn(module.up.shape[0], generator=gen)
    path_a = save_lora(a, tmp_path / "a.safetensors")
    path_b = save(write_wan(b), tmp_path / "b.safetensors")
    ref, ours = diffusers_pipe(tiny_ckpt_hd128), copy.deepcopy(ours_hd128)
    ref.load_lora_weights(str(path_a), adapter_name="a")
    ref.load_lora_weights(str(path_b), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.8, 0.3])
    load_lora(ours, path_a, "a", scale=0.8)
    load_lora(ours, path_b, "b", scale=0.3)
    assert max_diff(forward(ours), forward(by_hand(ours_hd128, (a, 0.8), (b, 0.3)))) <= TOL
    assert max_diff(forward(ours), forward(ref.transformer)) <= TOL
    ref.set_adapters(["b"], adapter_weights=[1.0])
    set_adapters(ours, ["b"], [1.0])
    assert max_diff(forward(ours), forward(ref.transformer)) <= TOL


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_diffusers_drops_norm_diffs_and_bare_keys_we_do_not(tiny_ckpt_hd128, ours_hd128, tmp_path):
    """Where the reference is wrong: diffusers silently ignores ``.diff`` on norms and keys without the
    ``transformer.`` prefix; we apply both (checked against the hand-applied delta)."""
    gen = torch.Generator().manual_seed(16)
    norm_only = {"blocks.0.norm2": LoraModule(diff=0.1 * torch.randn(ours_hd128.config.inner_dim, generator=gen))}
    lora = random_lora(ours_hd128, seed=13) | norm_only
    ref, ours = diffusers_pipe(tiny_ckpt_hd128), copy.deepcopy(ours_hd128)
    ref_plain = forward(ref.transformer)
    ref.load_lora_weights(str(save(write_wan(lora), tmp_path / "norm.safetensors")), adapter_name="n")
    without_norm = forward(by_hand(ours_hd128, (random_lora(ours_hd128, seed=13), 1.0)))
    assert max_diff(forward(ref.transformer), without_norm) <= TOL
    load_lora(ours, tmp_path / "norm.safetensors")
    assert max_diff(forward(ours), forward(by_hand(ours_hd128, (lora, 1.0)))) <= TOL
    assert max_diff(forward(ours), without_norm) > 1e-3
    bare = {k: v for k, v in write_diffusers(random_lora(ours_hd128, seed=14), prefix="").items() if "lora" in k}
    bare = save(bare, tmp_path / "bare.safetensors")  # (no .alpha keys: diffusers rejects those)
    ref = diffusers_pipe(tiny_ckpt_hd128)
    ref.load_lora_weights(str(bare), adapter_name="bare")
    assert torch.equal(forward(ref.transformer), ref_plain)  # nothing applied, at most a log line


# ------------------------------------------------------------------------------------------------------ bad files
def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_wrong_shapes_name_the_key_and_both_shapes(base, model, tmp_path):
    lora, gen = random_lora(base, seed=20), torch.Generator().manual_seed(22)
    lora["blocks.0.attn1.to_q"].up = torch.randn(64, RANK, generator=gen)
    path = save(write_diffusers(lora), tmp_path / "x.safetensors")
    with pytest.raises(ValueError) as err:
        load_lora(model, path)
    text = one_line(err)
    assert "x.safetensors: blocks.0.attn1.to_q lora_B is [64, 4] but the model's weight is [32, 32]" in text
    assert "transformer.blocks.0.attn1.to_q.lora_B.weight" in text
    lora = random_lora(base, seed=20)
    lora["blocks.1.ffn.net.0.proj"].up = torch.randn(64, 8, generator=gen)
    with pytest.raises(ValueError, match=r"lora_A is \[4, 32\] but lora_B is \[64, 8\] \(ranks 4 and 8 differ"):
        load_lora(model, write_diffusers(lora))
    norm = {"blocks.0.norm2": LoraModule(diff=torch.randn(16, generator=gen))}
    with pytest.raises(ValueError, match=r"blocks\.0\.norm2 diff is \[16\] but the model's weight is \[32\]"):
        load_lora(model, write_wan(norm))
    assert list_adapters(model) == []


def test_unknown_keys_fail_by_default_and_warn_when_not_strict(base, model, tmp_path):
    lora = random_lora(base, seed=21)
    tensors = write_wan(lora)
    tensors["diffusion_model.blocks.0.self_attn.mystery.lora_down.weight"] = torch.zeros(RANK, 32)
    tensors["diffusion_model.blocks.0.self_attn.mystery.lora_up.weight"] = torch.zeros(32, RANK)
    tensors["diffusion_model.blocks.9.self_attn.q.lora_down.weight"] = torch.zeros(RANK, 32)
    tensors["diffusion_model.blocks.9.self_attn.q.lora_up.weight"] = torch.zeros(32, RANK)
    path = save(tensors, tmp_path / "unknown.safetensors")
    with pytest.raises(ValueError) as err:
        load_lora(model, path)
    assert "4 key(s) match no layer" in one_line(err) and "self_attn.mystery" in one_line(err)
    assert list_adapters(model) == []
    with pytest.warns(UserWarning, match=r"4 key\(s\) match no layer.*blocks\.9\.self_attn\.q"):
        load_lora(model, path, strict=False)
    assert max_diff(forward(model), forward(by_hand(base, (lora, 1.0)))) <= TOL


def test_unreadable_files_raise_one_clear_error(model, tmp_path):
    good = save(write_diffusers(random_lora(model, seed=22)), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    no_lora = save({"blocks.0.attn1.to_q.weight": torch.zeros(32, 32)}, tmp_path / "full_weights.safetensors")
    cases = [
        (truncated, ValueError, r"truncated\.safetensors: truncated or corrupt"),
        (empty, ValueError, r"empty\.safetensors is empty \(0 bytes\)"),
        (
            no_lora,
            ValueError,
            r"full_weights\.safetensors: no LoRA keys .* e\.g\. \['blocks\.0\.attn1\.to_q\.weight'\]",
        ),
        (tmp_path / "missing.safetensors", FileNotFoundError, r"LoRA file not found: .*missing\.safetensors"),
        (tmp_path, ValueError, r"holds 4 \.safetensors files"),
    ]
    for path, kind, pattern in cases:
        with pytest.raises(kind, match=pattern) as err:
            load_lora(model, path)
        one_line(err)
    lone = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(RANK, 32)}
    with pytest.raises(ValueError, match="has no matching lora_A/lora_B pair"):
        load_lora(model, lone)
    assert list_adapters(model) == []


def test_adapter_names_are_checked(base, model):
    lora = write_diffusers(random_lora(base, seed=23))
    assert load_lora(model, lora) == "default"
    assert load_lora(model, lora) == "default_2"
    with pytest.raises(ValueError, match="already loaded"):
        load_lora(model, lora, "default")
    with pytest.raises(ValueError, match="letters, digits"):
        load_lora(model, lora, "my.lora")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        set_adapters(model, ["nope"])
