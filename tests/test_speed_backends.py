"""Attention backends (``--attention``): SDPA stays the default, bit for bit; other backends go through diffusers'
attention dispatcher; a backend whose package or device is missing is one line before the model loads."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image

from chronoedit import ChronoEditTransformer3DModel, cli, editing
from chronoedit.editing import resolve_model, service
from chronoedit.errors import UserError
from chronoedit.model.context_cache import ContextCache
from chronoedit.speed.attention import ATTENTION_NAMES, check_attention, dispatcher_backend, parse_attention


@pytest.fixture(scope="module")
def transformer(tiny_ckpt):
    return ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt, subfolder="transformer")


def _forward(model: ChronoEditTransformer3DModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 2, 4, 6, generator=gen)
    text = torch.randn(1, 512, cfg.text_dim, generator=gen)
    clip = torch.randn(1, 257, cfg.image_dim, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([731]), text, clip, return_dict=False)[0]


def test_names():
    assert parse_attention(None) == "sdpa" and parse_attention(" SDPA_Math ") == "sdpa-math"
    assert dispatcher_backend("sdpa") is None and dispatcher_backend("sage") == "sage"
    assert {"sdpa", "flash", "sage", "xformers"} <= set(ATTENTION_NAMES)
    with pytest.raises(UserError, match="attention") as info:
        parse_attention("fast")
    assert info.value.field == "attention"


def test_explicit_sdpa_is_the_default_bit_for_bit(transformer):
    """``sdpa`` and ``native`` are the direct SDPA call: identical to a model never told a backend."""
    default = _forward(transformer)
    try:
        transformer.set_attention_backend(dispatcher_backend(check_attention("sdpa", "cpu")))
        assert torch.equal(_forward(transformer), default)
        transformer.set_attention_backend("native")
        assert torch.equal(_forward(transformer), default)
    finally:
        transformer.reset_attention_backend()


def test_the_dispatcher_path_gives_the_same_numbers(transformer):
    """``sdpa-math`` runs every attention through diffusers' dispatch_attention_fn (math kernel): equal within fp32
    rounding; a spy confirms the dispatcher is what ran."""
    from diffusers.models import attention_dispatch

    default = _forward(transformer)
    calls = []
    real = attention_dispatch.dispatch_attention_fn

    def spy(*args, **kwargs):
        calls.append(kwargs["backend"])
        return real(*args, **kwargs)

    try:
        attention_dispatch.dispatch_attention_fn = spy
        transformer.set_attention_backend(dispatcher_backend("sdpa-math"))
        out = _forward(transformer)
    finally:
        attention_dispatch.dispatch_attention_fn = real
        transformer.reset_attention_backend()
    blocks = transformer.config.num_layers
    assert len(calls) == 3 * blocks and {c.value for c in calls} == {"_native_math"}  # self, text, image per block
    assert (out - default).abs().max().item() <= 1e-5
    assert torch.equal(_forward(transformer), default)  # reset: back to the direct call


@pytest.mark.parametrize(("name", "words"), [
    ("flash", "flash_attn package"),
    ("sage", "sageattention package"),
    ("sdpa-flash", "CUDA device"),
])  # fmt: skip
def test_a_missing_package_or_device_is_one_line(name, words):
    if importlib.util.find_spec(words.split()[0]) is not None:
        pytest.skip(f"{words} installed here")
    with pytest.raises(UserError) as info:
        resolve_model(attention=name, device="cpu")
    message = str(info.value)
    assert words in message and "\n" not in message and info.value.field == "attention"


def test_the_spec_carries_it():
    assert resolve_model(device="cpu").attention == "sdpa"
    assert resolve_model(device="cpu", attention="SDPA_MATH").attention == "sdpa-math"


def test_the_cli_loads_the_model_with_it(monkeypatch, capsys, tmp_path):
    """``--attention`` reaches the model spec the pipeline is loaded from, and the loaded transformer uses it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(editing.MODEL_PATH_ENV, raising=False)
    seen = {}
    real = service.load_pipeline

    def load(spec, report=service.QUIET):
        pipe = real(spec, report)
        seen["spec"] = spec
        seen["backends"] = {m.attention_backend for m in pipe.transformer.modules() if hasattr(m, "attention_backend")}
        return pipe

    monkeypatch.setattr(service, "load_pipeline", load)
    Image.new("RGB", (64, 48)).save(tmp_path / "in.png")
    code = cli.main(["edit", "-i", "in.png", "-p", "x", "--height", "32", "--width", "48", "--quiet",
                     "--num-inference-steps", "1", "--attention", "sdpa-math"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert seen["spec"].attention == "sdpa-math" and seen["backends"] == {"_native_math"}


def test_a_missing_backend_stops_the_cli_before_the_model_loads(monkeypatch, capsys, tmp_path):
    if importlib.util.find_spec("sageattention") is not None:
        pytest.skip("sageattention installed here")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(service, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    Image.new("RGB", (64, 48)).save(tmp_path / "in.png")
    code = cli.main(["edit", "-i", "in.png", "-p", "x", "--device", "cpu", "--attention", "sage"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--attention" in err[0] and "sageattention" in err[0]


# ------------------------------------------------------------------------------------------------------- --compile
def _tiny_model() -> ChronoEditTransformer3DModel:
    torch.manual_seed(0)
    return ChronoEditTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3,
        image_dim=16, added_kv_proj_dim=32, in_channels=36, out_channels=16,
    ).eval()  # fmt: skip


def _steps(model: ChronoEditTransformer3DModel, steps: int = 3) -> list[torch.Tensor]:
    """``steps`` forwards at new timesteps and latents, the context fixed; the first without, the others with a
    context cache (the pipeline's cross-attention keys and values once per edit)."""
    gen = torch.Generator().manual_seed(0)
    text, clip = torch.randn(1, 512, 16, generator=gen), torch.randn(1, 257, 16, generator=gen)
    cache = ContextCache()
    outs = []
    with torch.no_grad():
        for step in range(steps):
            x = torch.randn(1, 36, 2, 4, 6, generator=gen)  # [B, C, F, H, W]
            t = torch.tensor([900.0 - 100 * step])
            outs.append(model(x, t, text, clip, return_dict=False, context_cache=cache if step else None)[0])
    return outs


def test_compiled_blocks_equal_eager_and_compile_once():
    """Costs ~35 s on this 2-core CPU with a cold inductor cache (one compile of one tiny block; ~5 s warm). Three
    blocks over four steps reuse the first graphs: the blocks share them, new timesteps and latents of the same
    shapes and the cached keys and values (looked up eagerly, outside the graph) reuse them."""
    from torch._dynamo.utils import counters

    from chronoedit.speed.compile import compile_blocks, uncompile_blocks

    model = _tiny_model()
    eager = _steps(model, 4)
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch._inductor.config.patch(compile_threads=1):  # no compile worker processes left behind
            assert compile_blocks(model) == 3
            compiled = _steps(model, 4)
        graphs, recompiles = counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())
    finally:
        uncompile_blocks(model)
        torch._dynamo.reset()
    # one graph for a plain context, one (split where the keys and values are fetched) for cached ones: one recompile
    # at the switch, none per block or per step
    assert graphs <= 4 and recompiles <= 1
    assert max((a - b).abs().max().item() for a, b in zip(compiled, eager, strict=True)) <= 1e-5
    assert torch.equal(_steps(model, 1)[0], eager[0])  # uncompiled: eager again


def test_the_cli_compiles_the_loaded_model(monkeypatch, capsys, tmp_path):
    """``--compile`` reaches the spec and the loaded transformer's blocks are compiled (the compile itself is
    recorded, not run: the test above runs it)."""
    from chronoedit.speed import compile as compile_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(editing.MODEL_PATH_ENV, raising=False)
    compiled = []
    monkeypatch.setattr(compile_module, "compile_blocks", lambda transformer: compiled.append(len(transformer.blocks)))
    Image.new("RGB", (64, 48)).save(tmp_path / "in.png")
    code = cli.main(["edit", "-i", "in.png", "-p", "x", "--height", "32", "--width", "48", "--quiet",
                     "--num-inference-steps", "1", "--compile"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert len(compiled) == 1 and compiled[0] > 0
    assert resolve_model(device="cpu").compile is False


def test_compile_without_a_compiler_is_one_line(monkeypatch, capsys, tmp_path):
    from chronoedit.speed import compile as compile_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(service, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    Image.new("RGB", (64, 48)).save(tmp_path / "in.png")
    code = cli.main(["edit", "-i", "in.png", "-p", "x", "--device", "cpu", "--compile"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--compile" in err[0] and "C++ compiler" in err[0]
