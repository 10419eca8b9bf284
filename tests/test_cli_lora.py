"""``chronoedit edit`` with LoRAs, end to end through :func:`chronoedit.cli.main` on the tiny checkpoint (CPU, 32x32):
per-file scales, several LoRAs, a Wan/ComfyUI-layout file, the distill preset, and the one-line errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from chronoedit import ChronoEditTransformer3DModel, cli, editing
from chronoedit.editing import LoraSpec, service
from chronoedit.keymap import ours_to_original
from chronoedit.lora import LoraModule, save_lora

RANK = 4
ATTN = tuple(f"attn1.{proj}" for proj in ("to_q", "to_k", "to_v", "to_out.0"))
FAST = ["--height", "32", "--width", "32", "--seed", "11", "--device", "cpu", "--quiet"]
Modules = dict[str, LoraModule]


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tiny_ckpt) -> ChronoEditTransformer3DModel:
    return ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt, subfolder="transformer")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(editing.MODEL_PATH_ENV, raising=False)


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "in.png"
    Image.new("RGB", (48, 32), (200, 120, 40)).save(path)
    return path


def random_lora(model: torch.nn.Module, seed: int, width: int | None = None, alpha: float | None = None) -> Modules:
    """Rank 4, random non-zero up/down on q, k, v, o of every block's self-attention; ``width``: made for a model of
    another inner dimension."""
    gen = torch.Generator().manual_seed(seed)
    modules: Modules = {}
    for i in range(len(model.blocks)):
        for target in ATTN:
            out_dim, in_dim = model.get_submodule(f"blocks.{i}.{target}").weight.shape
            out_dim, in_dim = (width, width) if width is not None else (out_dim, in_dim)
            down, up = 0.3 * torch.randn(RANK, in_dim, generator=gen), 0.3 * torch.randn(out_dim, RANK, generator=gen)
            modules[f"blocks.{i}.{target}"] = LoraModule(down=down, up=up, alpha=alpha)
    return modules


def write_wan(modules: Modules, path: Path) -> Path:
    """Original Wan / ComfyUI names, written here independently of the library."""
    tensors = {}
    for name, m in modules.items():
        key = "diffusion_model." + ours_to_original(name)
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = m.down, m.up
        tensors[f"{key}.alpha"] = torch.tensor(m.alpha_value)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def run(capsys, *argv) -> tuple[int, list[str], list[str]]:
    """(exit code, stdout lines, stderr lines) of ``chronoedit edit``."""
    code = cli.main(["edit", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err.strip().splitlines()


def render(capsys, ckpt: Path, image: Path, output: str, *extra) -> np.ndarray:
    """The edited image of a successful 2-step run."""
    code, lines, err = run(capsys, "-i", image, "-p", "make it blue", "--model-path", ckpt, "-o", output,
                           "--num-inference-steps", "2", *FAST, *extra)  # fmt: skip
    assert code == 0, err
    assert lines == [f"wrote edited image: {output} (32x32)"]
    with Image.open(output) as result:
        return np.asarray(result.convert("RGB")).copy()


# ------------------------------------------------------------------------------------------------------- scales
def test_per_file_scale_equals_lora_scale_and_changes_the_image(capsys, base, tiny_ckpt, image, tmp_path):
    a = save_lora(random_lora(base, seed=1), tmp_path / "a.safetensors")
    plain = render(capsys, tiny_ckpt, image, "plain.png")
    suffix = render(capsys, tiny_ckpt, image, "suffix.png", "--lora-path", f"{a}:0.7")
    flag = render(capsys, tiny_ckpt, image, "flag.png", "--lora-path", a, "--lora-scale", "0.7")
    assert not np.array_equal(suffix, plain)
    assert np.array_equal(suffix, flag)


def test_two_loras_differ_from_one(capsys, base, tiny_ckpt, image, tmp_path):
    a = save_lora(random_lora(base, seed=2), tmp_path / "a.safetensors")
    b = save_lora(random_lora(base, seed=3), tmp_path / "b.safetensors")
    one = render(capsys, tiny_ckpt, image, "one.png", "--lora-path", f"{a}:0.5")
    two = render(capsys, tiny_ckpt, image, "two.png", "--lora-path", f"{a}:0.5", f"{b}:1.0")
    assert not np.array_equal(one, two)


def test_wan_layout_file_loads_like_its_diffusers_twin(capsys, base, tiny_ckpt, image, tmp_path):
    lora = random_lora(base, seed=4, alpha=8.0)  # alpha != rank: the .alpha keys must be honoured
    wan = write_wan(lora, tmp_path / "wan.safetensors")
    twin = save_lora(lora, tmp_path / "twin.safetensors")  # diffusers layout, alpha in the header
    with safe_open(str(wan), framework="pt") as handle:
        keys = set(handle.keys())
    q = "diffusion_model.blocks.0.self_attn.q"  # the original name of blocks.0.attn1.to_q
    assert {f"{q}.lora_down.weight", f"{q}.lora_up.weight", f"{q}.alpha"} <= keys
    plain = render(capsys, tiny_ckpt, image, "plain.png")
    from_wan = render(capsys, tiny_ckpt, image, "wan.png", "--lora-path", wan)
    from_twin = render(capsys, tiny_ckpt, image, "twin.png", "--lora-path", twin)
    assert not np.array_equal(from_wan, plain)
    assert np.array_equal(from_wan, from_twin)


# ------------------------------------------------------------------------------------------------------- preset
def test_distill_preset_finds_the_checkpoint_lora_and_its_settings(capsys, monkeypatch, base, tiny_ckpt, image,
                                                                   tmp_path):  # fmt: skip
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    (ckpt / "lora").mkdir()
    save_lora(random_lora(base, seed=5), ckpt / "lora" / "chronoedit_distill_lora.safetensors")
    seen = {}
    original = service.generate

    def recording(pipe, edit, *args, **kwargs):
        out = original(pipe, edit, *args, **kwargs)
        config = pipe.scheduler.config
        shift = config.get("flow_shift", config.get("shift"))
        seen.update(job=edit, adapters=pipe.get_active_adapters(), shift=shift)
        return out

    monkeypatch.setattr(service, "generate", recording)
    code, lines, err = run(capsys, "-i", image, "-p", "make it blue", "--model-path", ckpt, "-o", "x.png",
                           "--preset", "distill", *FAST)  # fmt: skip
    assert code == 0, err
    assert lines == ["wrote edited image: x.png (32x32)"] and err == []  # --quiet: no stage lines
    assert (tmp_path / "x.png").is_file()
    job = seen["job"]
    assert (job.num_inference_steps, job.guidance_scale, job.flow_shift) == (8, 1.0, 2.0)
    assert job.loras == (LoraSpec(ckpt / "lora" / "chronoedit_distill_lora.safetensors", 1.0),)
    assert seen["adapters"] == ["chronoedit_distill_lora"] and seen["shift"] == 2.0


# ------------------------------------------------------------------------------------------------------- errors
def test_lora_of_another_width_is_one_line_naming_key_and_shapes(capsys, base, tiny_ckpt, image, tmp_path):
    dim = base.config.inner_dim
    wide = save_lora(random_lora(base, seed=6, width=2 * dim), tmp_path / "wide.safetensors")
    code, lines, err = run(capsys, "-i", image, "-p", "make it blue", "--model-path", tiny_ckpt, "-o", "x.png",
                           "--num-inference-steps", "2", *FAST, "--lora-path", wide)  # fmt: skip
    assert code == 2 and lines == []
    assert len(err) == 1, err
    pattern = (
        rf"^chronoedit: error: LoRA .*wide\.safetensors: (blocks\.\d+\.attn1\.\S+) lora_A is \[4, {2 * dim}\] "
        rf"but the model's weight is \[{dim}, {dim}\] \(key 'transformer\.\1\.lora_A\.weight'\)$"
    )
    assert re.match(pattern, err[0]), err[0]
    assert not (tmp_path / "x.png").exists()


def test_unknown_keys_fail_unless_allowed(capsys, base, tiny_ckpt, image, tmp_path):
    lora = random_lora(base, seed=7)
    known = save_lora(lora, tmp_path / "known.safetensors")
    mystery = LoraModule(down=torch.ones(RANK, base.config.inner_dim), up=torch.ones(base.config.inner_dim, RANK))
    odd = save_lora({**lora, "blocks.0.attn1.mystery": mystery}, tmp_path / "odd.safetensors")
    argv = ["-i", image, "-p", "make it blue", "--model-path", tiny_ckpt, "-o", "x.png", "--num-inference-steps", "2",
            *FAST, "--lora-path", odd]  # fmt: skip
    code, lines, err = run(capsys, *argv)
    assert code == 2 and lines == [] and len(err) == 1, err
    assert "odd.safetensors: 2 key(s) match no layer" in err[0] and "attn1.mystery" in err[0]
    assert not (tmp_path / "x.png").exists()
    with pytest.warns(UserWarning, match=r"odd\.safetensors: 2 key\(s\) match no layer.*; skipped"):
        code, lines, err = run(capsys, *argv, "--lora-allow-unmatched")
    assert code == 0, err
    assert lines == ["wrote edited image: x.png (32x32)"]
    with Image.open(tmp_path / "x.png") as result:
        allowed = np.asarray(result.convert("RGB")).copy()
    assert np.array_equal(allowed, render(capsys, tiny_ckpt, image, "known.png", "--lora-path", known))
