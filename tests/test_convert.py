"""``chronoedit convert``: any readable transformer -> a diffusers-layout folder that ours and diffusers load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from chronoedit import ChronoEditTransformer3DModel, cli
from chronoedit.commands.convert import parse_size
from chronoedit.errors import UserError
from chronoedit.keymap import ours_to_original
from chronoedit.saving import plan_shards, save_transformer


@pytest.fixture(scope="module")
def model(tiny_ckpt_hd128):
    return ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt_hd128, subfolder="transformer")


def forward(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=gen)
    text, clip = torch.randn(1, 512, cfg.text_dim, generator=gen), torch.randn(1, 257, cfg.image_dim, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([300]), text, clip, return_dict=False)[0]


def test_comfy_file_converts_to_a_sharded_folder_both_libraries_load(model, tmp_path, capsys):
    comfy = tmp_path / "chrono_edit_14B_fp16.safetensors"
    save_file({"model.diffusion_model." + ours_to_original(k): v.contiguous() for k, v in model.state_dict().items()},
              str(comfy))  # fmt: skip
    out = tmp_path / "transformer"
    assert cli.main(["convert", str(comfy), str(out), "--dtype", "fp32", "--max-shard-size", "1MB"]) == 0
    assert "wrote transformer folder" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "ChronoEditTransformer3DModel" and config["rope_temporal_skip_len"] == 8
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(model.state_dict())
    expected = forward(model)
    assert torch.equal(forward(ChronoEditTransformer3DModel.from_pretrained(out)), expected)
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.ChronoEditTransformer3DModel.from_pretrained(out).eval()
    assert (forward(ref) - expected).abs().max() <= 1e-5


def test_checkpoint_folder_converts_its_transformer_in_bf16(tiny_ckpt_hd128, model, tmp_path):
    out = tmp_path / "bf16"
    assert cli.main(["convert", str(tiny_ckpt_hd128), str(out)]) == 0
    converted = ChronoEditTransformer3DModel.from_pretrained(out, torch_dtype=torch.bfloat16)
    assert converted.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert converted.scale_shift_table.dtype == torch.float32  # fp32 islands survive the round trip
    assert torch.equal(converted.blocks[0].attn1.to_q.weight, model.blocks[0].attn1.to_q.weight.bfloat16())


def test_existing_output_is_refused_with_one_line(tiny_ckpt_hd128, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert cli.main(["convert", str(tiny_ckpt_hd128), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"chronoedit: error: output folder already exists: {out}"]
    assert list(out.iterdir()) == []


def test_bad_shard_size_and_missing_source(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "nope"), str(tmp_path / "out"), "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["lots", "inf", "nanGB", "0", "-5MB"])
def test_bad_shard_sizes_are_user_errors(text):
    with pytest.raises(UserError, match="--max-shard-size") as err:
        parse_size(text)
    assert err.value.field == "max_shard_size"


def test_a_config_that_is_no_json_object_is_one_line(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text("[1, 2]")
    code = cli.main(["convert", str(tmp_path / "nope"), str(tmp_path / "out"), "--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"chronoedit: error: {config}: expected a JSON object of settings, got a JSON "
                                 "list"], err  # fmt: skip


def test_an_output_folder_that_cannot_be_written_is_a_user_error(model, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match=rf"cannot write {tmp_path / 'file' / 'out'}: "):
        save_transformer(model, tmp_path / "file" / "out")


def test_plan_shards_respects_the_limit():
    sizes = [("a", 40), ("b", 40), ("c", 100), ("d", 10)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards(sizes, 1000) == [["a", "b", "c", "d"]]
