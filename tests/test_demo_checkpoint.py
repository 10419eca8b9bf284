"""chronoedit.demo: tiny random checkpoints in the real diffusers layout load and run with diffusers' own pipeline."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chronoedit import demo


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything in these tests opens an internet connection."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise RuntimeError(f"network access attempted: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        part = load_file(str(file))
        assert not set(part) & set(tensors), f"duplicate keys in {file.name}"
        tensors.update(part)
    return tensors


def test_layout_and_configs(tiny_ckpt: Path, tiny_spec: demo.TinySpec) -> None:
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "image_encoder", "image_processor", "scheduler"):
        assert (tiny_ckpt / sub).is_dir(), sub
    assert json.loads((tiny_ckpt / "model_index.json").read_text()) == demo.MODEL_INDEX
    cfg = json.loads((tiny_ckpt / "transformer" / "config.json").read_text())
    assert cfg["_class_name"] == "WanTransformer3DModel"
    assert "rope_temporal_skip_len" not in cfg
    dim = tiny_spec.num_attention_heads * tiny_spec.attention_head_dim
    assert (cfg["in_channels"], cfg["out_channels"], cfg["added_kv_proj_dim"]) == (36, 16, dim)
    assert cfg["patch_size"] == [1, 2, 2] and cfg["qk_norm"] == "rms_norm_across_heads" and cfg["image_dim"] == 32
    assert (tiny_ckpt / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    sched = json.loads((tiny_ckpt / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "UniPCMultistepScheduler"
    assert (sched["prediction_type"], sched["use_flow_sigmas"], sched["flow_shift"]) == ("flow_prediction", True, 5.0)
    proc = json.loads((tiny_ckpt / "image_processor" / "preprocessor_config.json").read_text())
    assert proc["size"] == {"shortest_edge": 224} and proc["resample"] == 3
    assert proc["crop_size"] == {"height": 224, "width": 224} and proc["image_mean"] == demo.CLIP_MEAN
    vae = json.loads((tiny_ckpt / "vae" / "config.json").read_text())
    assert all(abs(x) < 0.5 for x in vae["latents_mean"]) and all(0.8 <= x <= 3.0 for x in vae["latents_std"])


def test_diffusers_pipeline_runs(tiny_ckpt: Path) -> None:
    import diffusers

    transformer = diffusers.ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt, subfolder="transformer")
    assert transformer.config.rope_temporal_skip_len == 8
    pipe = diffusers.ChronoEditPipeline.from_pretrained(tiny_ckpt, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        image=demo.draw_example_image(),
        prompt="The user wants to turn the cup red.",
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    frames = out.frames
    assert frames.shape == (1, 5, 32, 32, 3)
    assert np.isfinite(frames).all() and frames.std() > 0.01


def test_weights_perturbed(tiny_ckpt: Path) -> None:
    """No tensor is constant any more: a skipped norm scale or zero bias shows in parity tests."""
    for sub in ("transformer", "vae", "text_encoder", "image_encoder"):
        for key, value in _folder_tensors(tiny_ckpt / sub).items():
            if value.numel() > 1:
                assert value.float().std() > 1e-3, f"{sub}/{key} is constant"
            if "norm" in key and key.endswith(("weight", "gamma")):
                assert 0.5 < value.float().mean() < 1.5, f"{sub}/{key} is not a perturbed norm scale"


def test_sharded_transformer(tiny_ckpt_hd128: Path, tiny_spec_hd128: demo.TinySpec) -> None:
    folder = tiny_ckpt_hd128 / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert shard_files == [f"diffusion_pytorch_model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == shard_files
    per_file = {name: set(load_file(str(folder / name))) for name in shard_files}
    for name, keys in per_file.items():
        assert keys == {k for k, f in index["weight_map"].items() if f == name}
    tensors = _folder_tensors(folder)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())

    reference = demo.tiny_transformer_state_dict(replace(tiny_spec_hd128, shards=1))  # what an unsharded build saves
    assert set(reference) == set(tensors)
    assert all(torch.equal(reference[k], tensors[k]) for k in reference)


def test_sharded_transformer_loads_in_diffusers(tiny_ckpt_hd128: Path) -> None:
    import diffusers

    model = diffusers.ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt_hd128, subfolder="transformer")
    tensors = _folder_tensors(tiny_ckpt_hd128 / "transformer")
    state = model.state_dict()
    assert set(state) == set(tensors)
    assert all(torch.equal(state[k], tensors[k]) for k in tensors)
    assert model.config.attention_head_dim == 128


def test_builds_are_deterministic(tiny_ckpt: Path, tiny_spec: demo.TinySpec, tmp_path: Path) -> None:
    again = demo.build_tiny_checkpoint(tmp_path / "again", tiny_spec)
    files = sorted(p.relative_to(tiny_ckpt) for p in tiny_ckpt.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (tiny_ckpt / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = demo.tiny_transformer_state_dict(replace(tiny_spec, seed=1))
    ours = load_file(str(tiny_ckpt / "transformer" / demo.SAFETENSORS_NAME))
    assert not torch.equal(other["proj_out.weight"], ours["proj_out.weight"])


def test_tokenizer_eos_and_padding(tiny_ckpt: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt / "tokenizer")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert 500 <= len(tok) <= 1000
    enc = tok(["The user wants to turn the cup red."], padding="max_length", max_length=24, truncation=True)
    ids, mask = enc.input_ids[0], enc.attention_mask[0]
    n = sum(mask)
    assert 2 < n < 24 and ids[n - 1] == 1 and ids.count(1) == 1
    assert ids[n:] == [0] * (24 - n) and mask == [1] * n + [0] * (24 - n)
    assert 2 not in ids[: n - 1], "common words should not be unknown"
    vocab = json.loads((tiny_ckpt / "text_encoder" / "config.json").read_text())["vocab_size"]
    assert vocab >= len(tok)


def test_clip_penultimate_hidden_state(tiny_ckpt: Path, tiny_spec: demo.TinySpec) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionModel

    processor = CLIPImageProcessor.from_pretrained(tiny_ckpt / "image_processor")
    model = CLIPVisionModel.from_pretrained(tiny_ckpt / "image_encoder")
    pixels = processor(images=demo.draw_example_image(), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == tiny_spec.clip_layers + 1
    assert hidden[-2].shape == (1, 257, tiny_spec.image_dim)
    assert not torch.allclose(hidden[-2], hidden[-1]) and not torch.allclose(hidden[-2], hidden[0])


def test_ensure_demo_checkpoint_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "DEMO_SPEC", demo.TinySpec(attention_head_dim=16))  # smaller, faster build
    target = tmp_path / "cache" / "demo-v1"
    assert demo.ensure_demo_checkpoint(target) == target
    assert (target / "model_index.json").is_file()
    stamp = (target / "model_index.json").stat().st_mtime_ns

    def no_rebuild(*args: object, **kwargs: object) -> Path:
        raise AssertionError("rebuilt an existing demo checkpoint")

    monkeypatch.setattr(demo, "build_tiny_checkpoint", no_rebuild)
    assert demo.ensure_demo_checkpoint(target) == target
    assert (target / "model_index.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in target.parent.iterdir()) == ["demo-v1"], "temporary build folder left behind"


def test_ensure_demo_checkpoint_cleans_up_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(root: Path, spec: demo.TinySpec) -> Path:
        (Path(root) / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(demo, "build_tiny_checkpoint", broken)
    with pytest.raises(RuntimeError, match="boom"):
        demo.ensure_demo_checkpoint(tmp_path / "demo-v1")
    assert list(tmp_path.iterdir()) == []


def test_default_demo_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHRONOEDIT_HOME", str(tmp_path))
    assert demo.default_demo_dir() == tmp_path / "demo-v1"
    monkeypatch.delenv("CHRONOEDIT_HOME")
    assert demo.default_demo_dir() == Path.home() / ".cache" / "chronoedit" / "demo-v1"


def test_split_by_size_gives_nonempty_groups() -> None:
    sizes = [("a", 1000), ("b", 1), ("c", 1), ("d", 1)]
    groups = demo._split_by_size(sizes, 3)
    assert len(groups) == 3 and all(groups) and [k for g in groups for k in g] == ["a", "b", "c", "d"]
    with pytest.raises(ValueError):
        demo._split_by_size(sizes, 5)


def test_shipped_example_image() -> None:
    from PIL import Image

    path = Path(demo.__file__).parent / "assets" / "example.png"
    assert path.stat().st_size < 60_000
    with Image.open(path) as shipped:
        assert shipped.size == (384, 256) and shipped.mode == "RGB"
        assert np.array_equal(np.asarray(shipped), np.asarray(demo.draw_example_image()))
