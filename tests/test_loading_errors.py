"""Loading a checkpoint: every way a folder can be wrong gives a UserError naming the problem; dtype islands,
the real config's quirks and RoPE where the reference is wrong (REFERENCE §1, §4).

One tiny checkpoint in the real diffusers layout is built per module; each bad case alters a copy of it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chronoedit import ChronoEditTransformer3DModel, loading
from chronoedit.demo import TinySpec
from chronoedit.errors import UserError
from chronoedit.model.rope import apply_rotary, axis_dims, temporal_positions
from chronoedit.pipeline import ChronoEditPipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPEC = TinySpec(attention_head_dim=16, num_attention_heads=2)
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
COMPONENTS = ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor", "scheduler", "transformer")


@pytest.fixture(scope="module")
def tiny(tiny_ckpt, tiny_spec) -> Path:
    assert tiny_spec == SPEC  # the session checkpoint is the one these tests are written for
    return tiny_ckpt


@pytest.fixture
def ckpt(tiny, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, free to break."""
    return Path(shutil.copytree(tiny, tmp_path / "ckpt"))


def _others(name: str) -> dict[str, object]:
    """Stand-ins for every component but ``name``, so only that one is loaded from the folder."""
    return {other: object() for other in COMPONENTS if other != name}


def _transformer_weights(folder: Path) -> Path:
    return folder / "transformer" / WEIGHTS


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------ the checkpoint location
def test_missing_checkpoint_folder_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such-checkpoint"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        loading.load_pipeline_components(missing)
    with pytest.raises(UserError, match=re.escape(str(missing))):
        ChronoEditPipeline.from_pretrained(str(missing))
    with pytest.raises(UserError, match=re.escape(str(missing))):
        ChronoEditTransformer3DModel.from_pretrained(str(missing), subfolder="transformer")


def test_public_transformer_class_is_the_pure_model_with_from_pretrained(tiny):
    """``chronoedit.model`` holds no IO; ``chronoedit.ChronoEditTransformer3DModel`` adds diffusers' loading to it."""
    from chronoedit.model import ChronoEditTransformer3DModel as PureModel

    assert issubclass(ChronoEditTransformer3DModel, PureModel) and not hasattr(PureModel, "from_pretrained")
    model = ChronoEditTransformer3DModel.from_pretrained(str(tiny), subfolder="transformer")
    assert type(model) is ChronoEditTransformer3DModel
    assert type(loading.load_transformer(tiny, subfolder="transformer")) is ChronoEditTransformer3DModel


def test_bad_transformer_config_is_a_user_error(ckpt):
    _edit_config(ckpt, qk_norm="layer_norm")
    where = re.escape(str(ckpt / "transformer" / "config.json"))
    with pytest.raises(UserError, match=rf"^{where}: unsupported qk_norm 'layer_norm'"):
        loading.load_transformer(ckpt, subfolder="transformer")


@pytest.mark.parametrize("key, value, says", [
    ("num_attention_heads", -2, "num_attention_heads must be a whole number from 1 to 1024, got -2"),
    ("num_attention_heads", 0, "num_attention_heads must be a whole number from 1 to 1024, got 0"),
    ("num_layers", "2", "num_layers must be a whole number from 0 to 1024, got '2'"),
    ("num_layers", 10**9, "num_layers must be a whole number from 0 to 1024, got 1000000000"),
    ("ffn_dim", 64.0, "ffn_dim must be a whole number"),
    ("attention_head_dim", True, "attention_head_dim must be a whole number"),
    ("image_dim", -1, "image_dim must be null or a whole number"),
    ("patch_size", [1, 2], "patch_size must be 3 whole numbers from 1 to 64, got [1, 2]"),
    ("patch_size", [1, -2, 2], "patch_size must be 3 whole numbers"),
    ("cross_attn_norm", "yes", "cross_attn_norm must be true or false, got 'yes'"),
    ("eps", float("nan"), "eps must be a number between 0 and 1, got nan"),
    ("qk_norm", 3, "qk_norm must be a string, got 3"),
])  # fmt: skip
def test_config_values_of_the_wrong_type_or_range_name_the_file_and_key(ckpt, key, value, says):
    """A transformer config.json with a wrong JSON type or a non-positive (or absurd) size is one line naming the
    file and the key, raised before any model is built."""
    _edit_config(ckpt, **{key: value})
    where = re.escape(str(ckpt / "transformer" / "config.json"))
    with pytest.raises(UserError, match=rf"^{where}: {re.escape(says)}"):
        loading.load_transformer(ckpt, subfolder="transformer")


@pytest.mark.parametrize("text, kind", [("[1, 2]", "list"), ('"config"', "string"), ("null", "null")])
def test_config_that_is_not_a_json_object_names_the_file(ckpt, text, kind):
    path = ckpt / "transformer" / "config.json"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: expected a JSON object of settings, got a JSON "
                                        rf"{kind}$"):
        loading.load_transformer(ckpt, subfolder="transformer")


def test_unknown_repo_id_offline_is_a_user_error_without_hanging(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.chdir(tmp_path)  # "owner/name" must not exist as a relative folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # nothing cached
    repo = "chronoedit-tests/no-such-model"
    start = time.monotonic()
    with pytest.raises(UserError, match=re.escape(repo)):
        loading.load_pipeline_components(repo)
    assert time.monotonic() - start < 30, "an offline lookup must fail fast, not wait on the network"


def test_file_instead_of_folder_is_a_user_error(tiny):
    path = tiny / "model_index.json"
    with pytest.raises(UserError, match=f"not a folder.*{re.escape(str(path))}"):
        loading.load_pipeline_components(path)
    with pytest.raises(UserError, match=r"not a folder or a \.safetensors file"):
        loading.load_transformer(tiny / "transformer" / "config.json")


@pytest.mark.parametrize("component", COMPONENTS)
def test_missing_component_folder_names_the_component(ckpt, component):
    shutil.rmtree(ckpt / component)
    with pytest.raises(UserError, match=rf"'{component}/'.*component {component} is missing"):
        loading.load_pipeline_components(ckpt, **_others(component))


def test_missing_component_through_the_pipeline(ckpt):
    """The real entry point, every other component really loaded: still the component's name."""
    shutil.rmtree(ckpt / "transformer")
    with pytest.raises(UserError, match="component transformer is missing"):
        ChronoEditPipeline.from_pretrained(str(ckpt))


# ------------------------------------------------------------------------------------ transformer config vs weights
def test_config_with_more_layers_names_a_missing_key(ckpt):
    _edit_config(ckpt, num_layers=SPEC.num_layers + 1)
    with pytest.raises(UserError, match=r"lack \d+ key\(s\).*'blocks\.2\.[\w.]+'"):
        loading.load_transformer(ckpt, subfolder="transformer")


def test_config_with_fewer_layers_names_an_unexpected_key(ckpt):
    _edit_config(ckpt, num_layers=SPEC.num_layers - 1)
    with pytest.raises(UserError, match=r"unexpected key 'blocks\.1\.[\w.]+'"):
        loading.load_transformer(ckpt, subfolder="transformer")


def test_extra_weight_key_is_named(ckpt):
    path = _transformer_weights(ckpt)
    state = load_file(path)
    state["blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(4, 32)
    save_file(state, path)
    with pytest.raises(
        UserError, match=rf"unexpected key 'blocks\.0\.attn1\.to_q\.lora_A\.weight' in {re.escape(str(path))}"
    ):
        loading.load_transformer(ckpt, subfolder="transformer")


def test_ignored_wan_key_is_skipped(ckpt):
    """Keys diffusers also ignores (``norm_added_q`` of some Wan checkpoints) are not an error."""
    path = _transformer_weights(ckpt)
    state = load_file(path)
    state["blocks.0.attn2.norm_added_q.weight"] = torch.ones(32)
    save_file(state, path)
    model = loading.load_transformer(ckpt, subfolder="transformer")
    assert "blocks.0.attn2.norm_added_q.weight" not in model.state_dict()


def test_wrong_shape_names_key_and_both_shapes(ckpt):
    path = _transformer_weights(ckpt)
    state = load_file(path)
    good = tuple(state["blocks.1.ffn.net.0.proj.weight"].shape)
    assert good == (64, 32)
    state["blocks.1.ffn.net.0.proj.weight"] = torch.zeros(48, 32)
    save_file(state, path)
    with pytest.raises(UserError) as info:
        loading.load_transformer(ckpt, subfolder="transformer")
    message = str(info.value)
    assert "'blocks.1.ffn.net.0.proj.weight'" in message
    assert "(48, 32)" in message and "(64, 32)" in message
    assert str(path) in message


def test_missing_weight_key_is_named(ckpt):
    path = _transformer_weights(ckpt)
    state = load_file(path)
    del state["proj_out.bias"]
    save_file(state, path)
    with pytest.raises(UserError, match=re.escape("'proj_out.bias'")):
        loading.load_transformer(ckpt, subfolder="transformer")


# ------------------------------------------------------------------------------------------------ broken files
@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["half", "empty"])
def test_truncated_or_empty_safetensors(ckpt, keep):
    path = _transformer_weights(ckpt)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert path.stat().st_size == int(len(data) * keep)
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}.*(truncated|corrupt)"):
        loading.load_transformer(ckpt, subfolder="transformer")


def _shard(ckpt: Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Rewrite the transformer as two shards plus an index; return the shard names and the full state."""
    folder = ckpt / "transformer"
    state = load_file(folder / WEIGHTS)
    keys = sorted(state)
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for name, half in zip(names, halves, strict=True):
        save_file({k: state[k] for k in half}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(half, name))
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / WEIGHTS).unlink()
    return names, state


def test_sharded_checkpoint_loads(ckpt):
    _, state = _shard(ckpt)
    model = loading.load_transformer(ckpt, subfolder="transformer")
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_index_listing_a_missing_shard_names_it(ckpt):
    names, _ = _shard(ckpt)
    (ckpt / "transformer" / names[1]).unlink()
    with pytest.raises(UserError, match=re.escape(names[1])):
        loading.load_transformer(ckpt, subfolder="transformer")


CONFIG_FILES = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "image_encoder": "config.json",
    "image_processor": "preprocessor_config.json",
    "scheduler": "scheduler_config.json",
    "tokenizer": "tokenizer_config.json",
}


@pytest.mark.parametrize("component", list(CONFIG_FILES))
def test_unparsable_config_is_a_user_error_naming_component(ckpt, component):
    path = ckpt / component / CONFIG_FILES[component]
    assert path.is_file()
    path.write_text('{"num_layers": 2,,')
    with pytest.raises(UserError, match=re.escape(str(ckpt / component))):
        loading.load_pipeline_components(ckpt, **_others(component))


@pytest.mark.parametrize("component", [c for c in CONFIG_FILES if c != "tokenizer"])
def test_unparsable_config_names_the_file(ckpt, component):
    path = ckpt / component / CONFIG_FILES[component]
    path.write_text('{"num_layers": 2,,')
    with pytest.raises(UserError, match=re.escape(str(path))):
        loading.load_pipeline_components(ckpt, **_others(component))


def test_unparsable_tokenizer_config_names_the_file(ckpt):
    path = ckpt / "tokenizer" / "tokenizer_config.json"
    path.write_text('{"num_layers": 2,,')
    with pytest.raises(UserError, match=re.escape(path.name)):
        loading.load_pipeline_components(ckpt, **_others("tokenizer"))


def test_unparsable_transformer_config_through_load_transformer(ckpt):
    path = ckpt / "transformer" / "config.json"
    path.write_text("not json at all")
    with pytest.raises(UserError, match=rf"cannot parse {re.escape(str(path))}"):
        loading.load_transformer(ckpt, subfolder="transformer")


# ----------------------------------------------------------------------------------------------- reduced precision
FP32_PARTS = {"time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"}


def test_bfloat16_load_keeps_the_fp32_islands(tiny):
    model = loading.load_transformer(tiny, subfolder="transformer", torch_dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert not any(p.is_meta for p in model.parameters())
    for name in (
        "condition_embedder.time_embedder.linear_1.weight",
        "condition_embedder.time_embedder.linear_2.bias",
        "scale_shift_table",
        "blocks.0.scale_shift_table",
        "blocks.1.norm2.weight",  # the affine cross-attention norm
        "blocks.1.norm2.bias",
        "condition_embedder.image_embedder.norm1.weight",
        "condition_embedder.image_embedder.norm2.bias",
    ):
        assert dtypes[name] == torch.float32, name
    for name in ("blocks.0.attn1.to_q.weight", "blocks.0.attn1.norm_q.weight", "blocks.0.ffn.net.2.weight",
                 "condition_embedder.time_proj.weight", "condition_embedder.text_embedder.linear_1.weight",
                 "patch_embedding.weight", "proj_out.weight"):  # fmt: skip
        assert dtypes[name] == torch.bfloat16, name
    for name, dtype in dtypes.items():
        keep = bool(FP32_PARTS & set(name.split(".")))
        assert dtype == (torch.float32 if keep else torch.bfloat16), name
    # norm1/norm3 of the blocks are not affine: nothing to keep, nothing loaded
    assert not any(re.search(r"blocks\.\d+\.norm[13]\.", name) for name in dtypes)

    full = loading.load_transformer(tiny, subfolder="transformer")
    for name, p in model.named_parameters():
        expected = full.get_parameter(name).to(p.dtype)
        assert torch.equal(p, expected), name


def test_rope_tables_stay_float32_after_model_to_bf16(tiny):
    model = loading.load_transformer(tiny, subfolder="transformer", torch_dtype=torch.bfloat16)
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    cos, sin = model.rope((2, 4, 4), torch.device("cpu"))
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32
    assert cos.shape == (1, 2 * 4 * 4, 1, SPEC.attention_head_dim // 2)
    # the bf16 model still runs, and its RoPE still places the edit frame at t = 7 exactly
    t_dims = axis_dims(SPEC.attention_head_dim)[0] // 2
    inv = [1.0 / 10000 ** (2 * k / axis_dims(SPEC.attention_head_dim)[0]) for k in range(t_dims)]
    last = cos[0, 4 * 4, 0, :t_dims]  # first token of frame 1
    assert torch.allclose(last.double(), torch.tensor([math.cos(7 * f) for f in inv], dtype=torch.float64), atol=1e-6)
    out = model(*_inputs(frames=2, dtype=torch.bfloat16), return_dict=False)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ---------------------------------------------------------------------------------------- the real config's quirks
def _inputs(frames: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 36, frames, 4, 4, generator=gen).to(dtype)
    timestep = torch.tensor([700.0])
    text = torch.randn(1, 512, SPEC.text_dim, generator=gen).to(dtype)
    image = torch.randn(1, 257, SPEC.image_dim, generator=gen).to(dtype)
    return hidden, timestep, text, image


def test_wan_class_name_without_skip_loads_with_skip_8(tiny):
    raw = json.loads((tiny / "transformer" / "config.json").read_text())
    assert raw["_class_name"] == "WanTransformer3DModel" and "rope_temporal_skip_len" not in raw  # as the real one
    model = loading.load_transformer(tiny, subfolder="transformer")
    assert isinstance(model, ChronoEditTransformer3DModel)
    assert model.config.rope_temporal_skip_len == 8 and model.rope.temporal_skip_len == 8


def test_temporal_positions():
    assert temporal_positions(2, 8).tolist() == [0.0, 7.0]
    assert temporal_positions(2, 2).tolist() == [0.0, 1.0]
    assert temporal_positions(1, 8).tolist() == [0.0]
    assert temporal_positions(3, 8).tolist() == [0.0, 1.0, 2.0]
    assert temporal_positions(8, 8).tolist() == [float(i) for i in range(8)]


def test_two_frame_forward_depends_on_the_skip(tiny, ckpt):
    skip8 = loading.load_transformer(tiny, subfolder="transformer")
    _edit_config(ckpt, rope_temporal_skip_len=2)
    skip2 = loading.load_transformer(ckpt, subfolder="transformer")
    assert skip2.rope.temporal_skip_len == 2
    with torch.no_grad():
        two = _inputs(frames=2)
        out8, out2 = skip8(*two, return_dict=False)[0], skip2(*two, return_dict=False)[0]
        assert (out8 - out2).abs().max() > 1e-4, "a 2-frame edit must see its frames at t = 0 and 7, not 0 and 1"
        three = _inputs(frames=3)  # any other frame count ignores the skip: identical outputs
        assert torch.equal(skip8(*three, return_dict=False)[0], skip2(*three, return_dict=False)[0])


# ------------------------------------------------------------------------------ RoPE where the reference is wrong
def _expected_angles(grid, dims, skip, theta=10000.0):
    """Plain-math angle table [L][head_dim // 2]: each axis rotated with its own d (REFERENCE §2 RoPE)."""
    frames, rows, cols = grid
    t_pos = [0, skip - 1] if frames == 2 else list(range(frames))
    table = []
    for f in range(frames):
        for h in range(rows):
            for w in range(cols):
                row = []
                for pos, d in ((t_pos[f], dims[0]), (h, dims[1]), (w, dims[2])):
                    row += [pos / theta ** (2 * k / d) for k in range(d // 2)]
                table.append(row)
    return table


@pytest.mark.parametrize(
    "head_dim, dims", [(64, (24, 20, 20)), (16, (8, 4, 4)), (128, (44, 42, 42)), (96, (32, 32, 32))]
)
def test_axis_dims(head_dim, dims):
    assert axis_dims(head_dim) == dims


@pytest.mark.parametrize("head_dim", [64, 16, 128])
@pytest.mark.parametrize("grid", [(2, 3, 2), (3, 2, 3)])
def test_rope_table_matches_plain_math(head_dim, grid):
    dims = {64: (24, 20, 20), 16: (8, 4, 4), 128: (44, 42, 42)}[head_dim]
    model = ChronoEditTransformer3DModel(
        num_attention_heads=1, attention_head_dim=head_dim, ffn_dim=8, num_layers=0, text_dim=8, image_dim=8,
        added_kv_proj_dim=head_dim,
    )  # fmt: skip
    cos, sin = model.rope(grid, torch.device("cpu"))
    angles = _expected_angles(grid, dims, skip=8)
    expected_cos = torch.tensor([[math.cos(a) for a in row] for row in angles], dtype=torch.float64)
    expected_sin = torch.tensor([[math.sin(a) for a in row] for row in angles], dtype=torch.float64)
    assert cos.shape == (1, math.prod(grid), 1, head_dim // 2) and cos.dtype == torch.float32
    torch.testing.assert_close(cos[0, :, 0].double(), expected_cos, atol=1e-7, rtol=0)
    torch.testing.assert_close(sin[0, :, 0].double(), expected_sin, atol=1e-7, rtol=0)


def test_apply_rotary_rotates_interleaved_pairs():
    head_dim, grid = 16, (2, 2, 2)
    model = ChronoEditTransformer3DModel(
        num_attention_heads=1, attention_head_dim=head_dim, ffn_dim=8, num_layers=0, text_dim=8, image_dim=8,
        added_kv_proj_dim=head_dim,
    )  # fmt: skip
    cos, sin = model.rope(grid, torch.device("cpu"))
    x = torch.randn(1, math.prod(grid), 1, head_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = apply_rotary(x.float(), cos, sin).double()
    angles = torch.tensor(_expected_angles(grid, (8, 4, 4), skip=8), dtype=torch.float64)  # [L, hd/2]
    pairs = torch.view_as_complex(x[0, :, 0].reshape(-1, head_dim // 2, 2).contiguous())
    rotated = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).reshape(-1, head_dim)
    torch.testing.assert_close(out[0, :, 0], rotated, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head_dim", [128, 64, 16])
def test_rope_vs_reference(head_dim):
    """Equal to diffusers' table at 128 (the real model); at 64 and 16 the reference splits its concatenated table
    at hd // 3 instead of 2 * (hd // 6) (§4): some channels rotate by another axis's position, and we do not."""
    from diffusers.models.transformers.transformer_chronoedit import ChronoEditRotaryPosEmbed

    grid = (2, 3, 3)
    cos, sin = ChronoEditTransformer3DModel(
        num_attention_heads=1, attention_head_dim=head_dim, ffn_dim=8, num_layers=0, text_dim=8, image_dim=8,
        added_kv_proj_dim=head_dim,
    ).rope(grid, torch.device("cpu"))  # fmt: skip
    reference = ChronoEditRotaryPosEmbed(head_dim, (1, 2, 2), 1024, temporal_skip_len=8)
    ref_cos, ref_sin = reference(torch.zeros(1, 1, grid[0], 2 * grid[1], 2 * grid[2]))  # [1, L, 1, hd], interleaved
    ours_cos, ours_sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    if head_dim == 128:
        torch.testing.assert_close(ours_cos, ref_cos.float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(ours_sin, ref_sin.float(), atol=1e-6, rtol=0)
    else:  # the low frequencies differ: small angles, but clearly more than float32 rounding
        assert (ours_sin - ref_sin.float()).abs().max() > 1e-3, "the reference's split is wrong for this head_dim"


@pytest.mark.parametrize("component", ["text_encoder", "image_encoder", "vae"])
def test_truncated_library_component_weights_name_the_component(ckpt, component):
    """transformers/diffusers raise SafetensorError for these: still one line naming the component."""
    weights = sorted((ckpt / component).glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(UserError, match=rf"cannot load {component} from .*{component}"):
        loading.load_pipeline_components(ckpt, **_others(component))
