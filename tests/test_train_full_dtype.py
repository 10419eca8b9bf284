"""A full fine-tune is saved in the base checkpoint's dtype (bf16 with the float32 islands as loaded), or in float32
with ``save_fp32``; the weights are the trained fp32 master weights, rounded once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from chronoedit.loading import load_transformer, weight_files
from chronoedit.model.transformer import keeps_fp32
from chronoedit.saving import save_transformer
from chronoedit.train import TrainConfig, train


@pytest.fixture(scope="module")
def bf16_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint with its transformer stored as the real one is: bf16, float32 islands."""
    folder = Path(shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("bf16") / "ckpt"))
    model = load_transformer(folder, subfolder="transformer", torch_dtype=torch.bfloat16)
    shutil.rmtree(folder / "transformer")
    save_transformer(model, folder / "transformer")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    source = Image.new("RGB", (32, 32), (128, 128, 128))
    target = source.copy()
    target.paste(Image.new("RGB", (16, 16), (255, 0, 0)), (8, 8))
    source.save(folder / "s.png")
    target.save(folder / "t.png")
    (folder / "metadata.csv").write_text("source,target,prompt\ns.png,t.png,add a red square\n")
    return folder


def stored(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in weight_files(folder) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("save_fp32", [False, True])
def test_a_full_fine_tune_is_saved_in_the_base_dtype_unless_fp32_is_asked(bf16_ckpt, data, tmp_path, save_fp32):
    out = tmp_path / "run"
    config = TrainConfig(model_path=str(bf16_ckpt), dataset=str(data), output_dir=str(out), mode="full",
                         height=32, width=32, mixed_precision="no", gradient_checkpointing=False, quiet=True,
                         learning_rate=1e-3, max_steps=2, checkpoint_every=2, save_fp32=save_fp32)  # fmt: skip
    result = train(config, log=lambda _: None)
    saved = stored(result.output)
    master = load_file(str(out / "checkpoints" / "checkpoint-000002" / "model.safetensors"))  # fp32, as trained
    assert saved.keys() == master.keys()
    assert {t.dtype for t in master.values()} == {torch.float32}
    islands = {k for k in saved if keeps_fp32(k)}
    assert islands and len(islands) < len(saved)
    for key, tensor in saved.items():
        wanted = torch.float32 if save_fp32 or key in islands else torch.bfloat16
        assert tensor.dtype == wanted, key
        assert torch.equal(tensor, master[key].to(wanted)), key
    base = stored(bf16_ckpt / "transformer")
    if not save_fp32:  # the same dtypes as the base checkpoint, key by key
        assert {k: t.dtype for k, t in saved.items()} == {k: t.dtype for k, t in base.items()}
    assert not torch.equal(saved["blocks.0.attn1.to_q.weight"].float(), base["blocks.0.attn1.to_q.weight"].float())
