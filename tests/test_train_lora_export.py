"""The two LoRA files a training run writes load everywhere with the same edit: ``lora.safetensors`` (diffusers names,
alpha in the header) and ``lora_comfyui.safetensors`` (original Wan names with ``lora_A``/``lora_B``, alpha folded into
``lora_B``, ``.alpha`` = rank). A loader written here the way DiffSynth's ``GeneralLoRALoader`` (NVIDIA's inference
``pipe.load_lora``) matches keys finds every trained layer in the second file, with the trained delta."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from chronoedit import ChronoEditPipeline
from chronoedit.train import TrainConfig, train
from chronoedit.train.loop import COMFYUI_LORA_OUTPUT

RANK, ALPHA = 8, 16.0  # alpha != rank: the fold matters; a power-of-two ratio keeps the fold exact in floating point
# Our module names -> DiffSynth's WanModel names (its SelfAttention / CrossAttention q k v o k_img v_img, ffn.0/2),
# written out here independently of the library's key map.
OURS_TO_WAN = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tiny_ckpt_hd128, tmp_path_factory) -> Path:
    """A 3-step LoRA run (default targets: q k v o ffn.0 ffn.2 of both attentions) on 2 pairs; its output folder."""
    folder = tmp_path_factory.mktemp("export")
    data = folder / "data"
    data.mkdir()
    lines = ["source,target,prompt"]
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        source = Image.new("RGB", (32, 32), (128, 128, 128))
        target = source.copy()
        source.paste(Image.new("RGB", (16, 16), color), (0, 0))
        target.paste(Image.new("RGB", (16, 16), color), (16, 16))
        source.save(data / f"s{i}.png")
        target.save(data / f"t{i}.png")
        lines.append(f"s{i}.png,t{i}.png,move the block")
    (data / "metadata.csv").write_text("\n".join(lines) + "\n")
    config = TrainConfig(model_path=str(tiny_ckpt_hd128), dataset=str(data), output_dir=str(folder / "out"),
                         height=32, width=32, mixed_precision="no", gradient_checkpointing=False, quiet=True,
                         lora_rank=RANK, lora_alpha=ALPHA, learning_rate=1e-2, max_steps=3,
                         checkpoint_every=0)  # fmt: skip
    return train(config, log=lambda _: None).output.parent


def diffsynth_name_dict(lora: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """DiffSynth's ``GeneralLoRALoader.get_name_dict``: each ``.lora_B.`` key -> its module name (``lora_B`` and a
    following adapter name dropped, a leading ``diffusion_model`` dropped, the last part dropped) -> (B key, A key)."""
    found = {}
    for key in lora:
        if ".lora_B." not in key:
            continue
        parts = key.split(".")
        if len(parts) > parts.index("lora_B") + 2:
            parts.pop(parts.index("lora_B") + 1)
        parts.pop(parts.index("lora_B"))
        if parts[0] == "diffusion_model":
            parts.pop(0)
        parts.pop(-1)
        found[".".join(parts)] = (key, key.replace(".lora_B.", ".lora_A."))
    return found


def diffsynth_deltas(lora: dict[str, torch.Tensor], module_names: list[str]) -> dict[str, torch.Tensor]:
    """What DiffSynth's ``load`` adds to each matching module's weight: ``alpha * up @ down`` with alpha=1 (its
    default; ``.alpha`` keys are never read)."""
    names = diffsynth_name_dict(lora)
    return {name: lora[names[name][0]] @ lora[names[name][1]] for name in module_names if name in names}


def wan_module_names(blocks: int) -> list[str]:
    """Every Linear of DiffSynth's WanModel blocks, by its names."""
    return [f"blocks.{i}.{inner}" for i in range(blocks) for inner in OURS_TO_WAN.values()]


def trained_deltas(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diffusers file's deltas, (alpha / rank) * lora_B @ lora_A, by DiffSynth's module names."""
    out = {}
    for key, down in lora.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            block, inner = name.split(".", 2)[1], name.split(".", 2)[2]
            up = lora[key.replace(".lora_A.", ".lora_B.")]
            out[f"blocks.{block}.{OURS_TO_WAN[inner]}"] = (ALPHA / RANK) * (up @ down)
    return out


def test_the_comfyui_file_has_wan_names_with_lora_a_b_and_alpha_equal_to_the_rank(run):
    comfy = load_file(str(run / COMFYUI_LORA_OUTPUT))
    assert comfy and all(key.startswith("diffusion_model.blocks.") for key in comfy)
    leaves = {key.rsplit(".", 2)[-2] + "." + key.rsplit(".", 1)[-1] if "lora_" in key else "alpha" for key in comfy}
    assert leaves == {"lora_A.weight", "lora_B.weight", "alpha"}
    assert {float(t) for k, t in comfy.items() if k.endswith(".alpha")} == {float(RANK)}
    assert "diffusion_model.blocks.0.self_attn.q.lora_B.weight" in comfy
    assert "diffusion_model.blocks.1.ffn.2.lora_A.weight" in comfy


def test_a_diffsynth_style_loader_matches_every_trained_layer_with_the_trained_delta(run, tiny_ckpt_hd128):
    ours = load_file(str(run / "lora.safetensors"))
    comfy = load_file(str(run / COMFYUI_LORA_OUTPUT))
    expected = trained_deltas(ours)
    blocks = 1 + max(int(name.split(".")[1]) for name in expected)
    assert len(expected) == blocks * 10  # q k v o of both attentions, ffn.0, ffn.2: not k_img / v_img
    applied = diffsynth_deltas(comfy, wan_module_names(blocks))
    assert applied.keys() == expected.keys()
    for name, delta in expected.items():
        assert torch.equal(applied[name], delta), name  # alpha / rank = 2 folded exactly
    assert any(delta.abs().max() > 0 for delta in applied.values())  # trained away from zero
    assert diffsynth_deltas(ours, wan_module_names(blocks)) == {}  # why the second file exists: diffusers names


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_diffusers_and_our_loader_give_identical_edits_from_both_files(run, tiny_ckpt_hd128):
    import diffusers

    files = [str(run / "lora.safetensors"), str(run / COMFYUI_LORA_OUTPUT)]
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
    args = {"image": image, "prompt": "move the block", "height": 32, "width": 32, "num_inference_steps": 2,
            "guidance_scale": 5.0, "output_type": "np"}  # fmt: skip

    def edit(pipe, lora: str | None) -> np.ndarray:
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(lora)
        return pipe(generator=torch.Generator().manual_seed(5), **args).frames

    def reference() -> diffusers.ChronoEditPipeline:
        transformer = diffusers.ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt_hd128, subfolder="transformer")
        return diffusers.ChronoEditPipeline.from_pretrained(tiny_ckpt_hd128, transformer=transformer.eval())

    theirs = [edit(reference(), f) for f in files]
    ours = [edit(ChronoEditPipeline.from_pretrained(tiny_ckpt_hd128), f) for f in files]
    plain = edit(ChronoEditPipeline.from_pretrained(tiny_ckpt_hd128), None)
    assert np.array_equal(theirs[0], theirs[1])
    assert np.array_equal(ours[0], ours[1])
    assert np.abs(ours[0] - theirs[0]).max() <= 1e-4
    assert np.abs(ours[0] - plain).max() > 1e-3  # the LoRA does something
