"""The fine-tuning toolchain end to end: ``chronoedit label`` (VLM over HTTP) -> ``chronoedit train`` on its dataset
-> ``chronoedit edit --lora-path`` with the trained LoRA. Each step uses the previous step's files as they are."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from chronoedit import cli
from chronoedit.train.loop import read_log

pytest.importorskip("openai", reason="the label extra is not installed")

from test_label import PAIRS, answer, make_pairs  # the labeler's fake VLM and pair folders
from vlm_fakes import FakeOpenAIServer


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_label_then_train_then_edit_with_the_lora(tiny_ckpt, tmp_path, capsys, one_thread):
    fake = FakeOpenAIServer(answer)
    try:
        pairs = make_pairs(tmp_path / "pairs", PAIRS)
        code = cli.main(["label", str(pairs), "--out", str(tmp_path / "dataset"), "--vlm-base-url", fake.url,
                         "--vlm-model", "qwen-vl", "--quiet"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
    finally:
        fake.close()
    with open(tmp_path / "dataset" / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["key"] for r in rows) == ["a", "c", "d"]  # "b" has no change: filtered out

    out = tmp_path / "run"
    code = cli.main(["train", "--model-path", str(tiny_ckpt), "--dataset", str(tmp_path / "dataset"),
                     "--output-dir", str(out), "--height", "32", "--width", "32", "--mixed-precision", "no",
                     "--no-gradient-checkpointing", "--lora-rank", "8", "--learning-rate", "1e-2", "--max-steps", "8",
                     "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == list(range(1, 9))

    def edit(output, *extra):
        code = cli.main(["edit", "-i", str(pairs / "source" / "a.png"), "-p", rows[0]["prompt"], "--model-path",
                         str(tiny_ckpt), "--height", "32", "--width", "32", "--num-inference-steps", "2",
                         "--device", "cpu", "--quiet", "-o", str(output), *extra])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        return np.asarray(Image.open(output), dtype=np.float32)

    plain = edit(tmp_path / "plain.png")
    tuned = edit(tmp_path / "tuned.png", "--lora-path", str(out / "lora.safetensors"))
    assert np.abs(plain - tuned).max() > 1.0  # the LoRA trained on the labeled pairs changes the edit
    comfy = out / "lora_comfyui.safetensors"  # the same LoRA with the original Wan names
    with safe_open(comfy, "pt") as handle:
        names = list(handle.keys())
    assert names and all(name.startswith("diffusion_model.blocks.") for name in names)
    assert np.array_equal(edit(tmp_path / "comfy.png", "--lora-path", str(comfy)), tuned)
