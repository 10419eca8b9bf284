"""``chronoedit edit --transformer FILE``: a ComfyUI single file replaces the folder's transformer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from chronoedit import ChronoEditTransformer3DModel, cli
from chronoedit.keymap import ours_to_original

ARGS = ["-p", "x", "--height", "32", "--width", "32", "--num-inference-steps", "2", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def comfy_file(tiny_ckpt_hd128, tmp_path_factory):
    model = ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt_hd128, subfolder="transformer")
    path = tmp_path_factory.mktemp("comfy") / "chrono_edit_14B_fp16.safetensors"
    save_file({"model.diffusion_model." + ours_to_original(k): v.contiguous() for k, v in model.state_dict().items()},
              str(path))  # fmt: skip
    return path


def test_single_file_transformer_gives_the_folder_result(tiny_ckpt_hd128, comfy_file, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")).save(image)
    base = ["edit", "-i", str(image), "--model-path", str(tiny_ckpt_hd128), *ARGS]
    assert cli.main([*base, "-o", str(tmp_path / "folder.png")]) == 0
    assert cli.main([*base, "--transformer", str(comfy_file), "-o", str(tmp_path / "file.png")]) == 0
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "folder.png")), np.asarray(Image.open(tmp_path / "file.png"))
    )


def test_missing_or_wrong_transformer_path_is_one_line(tiny_ckpt_hd128, tmp_path, capsys):
    base = ["edit", "--model-path", str(tiny_ckpt_hd128), *ARGS, "-o", str(tmp_path / "o.png")]
    assert cli.main([*base, "--transformer", str(tmp_path / "nope.safetensors")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"chronoedit: error: --transformer not found: {tmp_path / 'nope.safetensors'}"
    )
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"x")
    assert cli.main([*base, "--transformer", str(bad)]) == 2
    assert "must be a .safetensors or .gguf file or a transformer folder" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
