"""Hostile LoRA files and absurd numbers are refused with one line, and NaN latents name their step and dtype.

- every layout's file with NaN/Inf in any tensor, a NaN/Inf alpha or an alpha that is not one number is refused on
  load, naming the file and the key (also in the header's alpha, and for a LoRA built in memory);
- a LoRA scale that is NaN/Inf or beyond +-100 is refused naming the LoRA wherever a scale comes in: the command
  line (``--lora-path FILE:SCALE``, ``--lora-scale``) of edit, batch and serve, the application layer, and the Python
  API (``load_lora``/``load_lora_weights``, ``set_adapters``);
- NaN/Inf latents during sampling stop the run at that step, naming it, the step count and the dtype the transformer
  ran in (an fp16 overflow is suggested only for float16).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import save_file
from serve_helpers import serve_args
from tiny_loras import LAYOUT_KEYS, TARGET, layout_tensors

from chronoedit import ChronoEditPipeline, ChronoEditTransformer3DModel, cli, editing
from chronoedit.commands.serve import build_state
from chronoedit.errors import UserError
from chronoedit.lora import (
    MAX_SCALE,
    METADATA_KEY,
    LoraFile,
    LoraModule,
    active_adapters,
    list_adapters,
    load_lora,
    read_lora,
    set_adapters,
)
from chronoedit.pipeline import check_finite

DIM = 32  # the tiny checkpoint's inner dimension
FAST = ["--height", "32", "--width", "32", "--num-inference-steps", "2", "--seed", "3", "--device", "cpu", "--quiet"]
LAYOUT_PARTS = [(layout, part) for layout, keys in LAYOUT_KEYS.items() for part in keys]
WITH_ALPHA = [layout for layout, keys in LAYOUT_KEYS.items() if "alpha" in keys]


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tiny_ckpt) -> ChronoEditTransformer3DModel:
    return ChronoEditTransformer3DModel.from_pretrained(tiny_ckpt, subfolder="transformer")


@pytest.fixture
def model(base) -> ChronoEditTransformer3DModel:
    return copy.deepcopy(base)


@pytest.fixture
def isolated(monkeypatch, tmp_path) -> Path:
    """Run in ``tmp_path`` without a model path from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(editing.MODEL_PATH_ENV, raising=False)
    return tmp_path


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 120, 40)).save(path)
    return path


def save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def poisoned(tensor: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``tensor`` with its first element set to ``value``."""
    out = tensor.clone()
    out.view(-1)[0] = value
    return out


def good_lora(tmp_path: Path, name: str = "good.safetensors", layout: str = "diffusers") -> Path:
    return save(layout_tensors(layout, DIM), tmp_path / name)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, UserError)
    return text


def run(capsys, command: str, *argv) -> tuple[int, list[str], list[str]]:
    """(exit code, stdout lines, stderr lines) of ``chronoedit COMMAND ARGV``."""
    code = cli.main([command, *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err.strip().splitlines()


# ------------------------------------------------------------------------------------------------ hostile files
@pytest.mark.parametrize("layout", list(LAYOUT_KEYS))
def test_the_clean_files_of_each_layout_load(layout, model, tmp_path):
    """The baseline of the cases below: unpoisoned, each layout's file reads and attaches."""
    lora = read_lora(good_lora(tmp_path, layout=layout))
    assert lora.layout == layout.removesuffix("-lora_A_B") and list(lora.modules) == [TARGET]
    assert load_lora(model, lora.source) == "good"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("layout", "part"), LAYOUT_PARTS)
def test_non_finite_values_are_refused_naming_file_and_key(layout, part, value, model, tmp_path):
    tensors = layout_tensors(layout, DIM)
    key = LAYOUT_KEYS[layout][part]
    tensors[key] = poisoned(tensors[key], value)
    path = save(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(UserError) as err:
        load_lora(model, path)
    assert one_line(err) == f"LoRA {path}: key {key!r} holds NaN/Inf values"
    assert list_adapters(model) == [] and not any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_non_finite_values_are_found_in_every_float_dtype(dtype, tmp_path):
    tensors = {k: v.to(dtype) for k, v in layout_tensors("wan", DIM).items()}
    key = LAYOUT_KEYS["wan"]["up"]
    tensors[key] = poisoned(tensors[key].float(), float("nan")).to(dtype)
    path = save(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match=re.escape(f"key {key!r} holds NaN/Inf values")):
        read_lora(path)
    tensors[key] = layout_tensors("wan", DIM)[LAYOUT_KEYS["wan"]["up"]].to(dtype)
    assert read_lora(save(tensors, tmp_path / "good.safetensors")).modules[TARGET].has_lora


@pytest.mark.parametrize("layout", WITH_ALPHA)
def test_an_alpha_that_is_not_one_number_is_refused(layout, tmp_path):
    tensors = layout_tensors(layout, DIM)
    key = LAYOUT_KEYS[layout]["alpha"]
    tensors[key] = torch.tensor([8.0, 4.0])
    path = save(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(UserError) as err:
        read_lora(path)
    assert one_line(err) == f"LoRA {path}: key {key!r} is [2] float32, not one number"
    tensors[key] = torch.tensor([[8.0]])  # one number, however shaped, is an alpha
    assert read_lora(save(tensors, tmp_path / "ok.safetensors")).modules[TARGET].alpha == 8.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"lora_alpha": float("nan")}, "gives blocks.0.attn1.to_q the alpha nan, not a finite number"),
        ({"lora_alpha": float("inf")}, "gives blocks.0.attn1.to_q the alpha inf, not a finite number"),
        ({"lora_alpha": "8"}, "gives blocks.0.attn1.to_q the alpha '8', not a finite number"),
        ({"lora_alpha": 8, "alpha_pattern": {"to_q": [1, 2]}}, "the alpha [1, 2], not a finite number"),
        ({"lora_alpha": 8, "alpha_pattern": {"(": 4}}, "has an alpha_pattern '(' that is no regular expression"),
        ({"lora_alpha": 8, "alpha_pattern": [4]}, "has an alpha_pattern that is not a mapping: [4]"),
    ],
    ids=["nan", "inf", "text", "list", "bad-regex", "not-a-mapping"],
)
def test_the_header_alpha_must_be_a_finite_number(config, message, tmp_path):
    """diffusers' files keep alpha in the header as JSON, which Python reads NaN and Infinity from."""
    tensors = layout_tensors("diffusers", DIM)
    del tensors[LAYOUT_KEYS["diffusers"]["alpha"]]
    header = json.dumps({f"transformer.{k}": v for k, v in config.items()})
    path = save(tensors, tmp_path / "bad.safetensors", {"format": "pt", METADATA_KEY: header})
    with pytest.raises(UserError) as err:
        read_lora(path)
    assert one_line(err).startswith(f"LoRA {path}: {METADATA_KEY} in the header ")
    assert message in one_line(err)


def test_a_header_that_is_no_json_object_is_refused(tmp_path):
    path = save(layout_tensors("diffusers", DIM), tmp_path / "bad.safetensors", {METADATA_KEY: "[8]"})
    with pytest.raises(UserError) as err:
        read_lora(path)
    assert one_line(err) == f"LoRA {path}: {METADATA_KEY} in the header is not a JSON object"


@pytest.mark.parametrize(("part", "shape"), [("down", (0, DIM)), ("up", (DIM, 0)), ("down", (DIM,)), ("up", (DIM,))])
def test_a_lora_pair_that_is_no_matrix_of_rank_1_or_more_is_refused(part, shape, tmp_path):
    tensors = layout_tensors("wan", DIM)
    key = LAYOUT_KEYS["wan"][part]
    tensors[key] = torch.zeros(shape)
    path = save(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(UserError) as err:
        read_lora(path)
    assert one_line(err) == f"LoRA {path}: key {key!r} is {list(shape)}, not a matrix of rank >= 1"


def test_a_lora_built_in_memory_is_checked_too(model):
    good = layout_tensors("diffusers", DIM)
    down, up = good[LAYOUT_KEYS["diffusers"]["down"]], good[LAYOUT_KEYS["diffusers"]["up"]]
    cases = [
        (LoraModule(down=poisoned(down, float("nan")), up=up), "blocks.0.attn1.to_q down holds NaN/Inf values"),
        (LoraModule(down=down, up=up, diff_b=poisoned(torch.zeros(DIM), float("inf"))), "to_q diff_b holds NaN/Inf"),
        (LoraModule(down=down, up=up, alpha=float("nan")), "blocks.0.attn1.to_q alpha is nan, not finite"),
    ]
    for module, message in cases:
        with pytest.raises(UserError) as err:
            load_lora(model, LoraFile(layout="diffusers", modules={TARGET: module}))
        assert one_line(err).startswith("LoRA <state dict>: ") and message in one_line(err)
    assert list_adapters(model) == []
    assert load_lora(model, LoraFile(layout="diffusers", modules={TARGET: LoraModule(down=down, up=up)}))


def test_a_nan_lora_is_one_line_on_the_command_line(capsys, isolated, tiny_ckpt, image):
    tensors = layout_tensors("wan", DIM)
    key = LAYOUT_KEYS["wan"]["diff_b"]
    tensors[key] = poisoned(tensors[key], float("nan"))
    bad = save(tensors, isolated / "bad.safetensors")
    code, lines, err = run(capsys, "edit", "-i", image, "-p", "x", "--model-path", tiny_ckpt, "-o", "x.png", *FAST,
                           "--lora-path", bad)  # fmt: skip
    assert (code, lines) == (2, [])
    assert err == [f"chronoedit: error: LoRA {bad}: key {key!r} holds NaN/Inf values"]
    assert not (isolated / "x.png").exists()


# ------------------------------------------------------------------------------------------------------- scales
ABSURD = ["nan", "inf", "-inf", "1e308", "100.5", "-101"]


def scale_error(path: Path | str, text: str) -> str:
    return f"the scale of LoRA {path} must be a finite number within +-100, got {float(text)!r}"


@pytest.mark.parametrize("text", ABSURD)
def test_cli_refuses_an_absurd_per_file_scale(text, capsys, isolated, tiny_ckpt, image):
    lora = good_lora(isolated)
    code, lines, err = run(capsys, "edit", "-i", image, "-p", "x", "--model-path", tiny_ckpt, "-o", "x.png", *FAST,
                           "--lora-path", f"{lora}:{text}")  # fmt: skip
    assert (code, lines) == (2, [])
    assert err == [f"chronoedit: error: {scale_error(lora, text)}"]
    assert not (isolated / "x.png").exists()


@pytest.mark.parametrize("text", ["nan", "1e308"])
def test_cli_refuses_an_absurd_lora_scale_flag(text, capsys, isolated, tiny_ckpt, image):
    lora = good_lora(isolated)
    argv = ["-i", image, "-p", "x", "--model-path", tiny_ckpt, "-o", "x.png", *FAST, "--lora-scale", text]
    code, _, err = run(capsys, "edit", *argv, "--lora-path", lora)
    assert code == 2 and err == [f"chronoedit: error: {scale_error(lora, text)}"]
    code, _, err = run(capsys, "edit", *argv)  # it would scale a preset's LoRAs: refused without --lora-path too
    without = f"the scale of LoRAs given without a scale must be a finite number within +-100, got {float(text)!r}"
    assert code == 2 and err == [f"chronoedit: error: {without}"]


@pytest.mark.parametrize("text", ["inf", "-1e308"])
def test_batch_and_serve_flags_refuse_an_absurd_scale(text, capsys, isolated, tiny_ckpt, image):
    """Batch rows and HTTP requests cannot name LoRAs or scales: theirs come from these flags, checked at start."""
    lora = good_lora(isolated)
    manifest = isolated / "rows.jsonl"
    manifest.write_text(json.dumps({"id": "a", "input": str(image), "prompt": "x"}) + "\n")
    code, lines, err = run(capsys, "batch", manifest, "--out", "out", "--model-path", tiny_ckpt, *FAST,
                           "--lora-path", f"{lora}:{text}")  # fmt: skip
    assert (code, lines) == (2, []) and err == [f"chronoedit: error: {scale_error(lora, text)}"]
    assert not (isolated / "out").exists()
    args = serve_args(isolated / "state", "--model-path", str(tiny_ckpt), "--lora-path", f"{lora}:{text}")
    with pytest.raises(UserError) as caught:
        build_state(args)
    assert one_line(caught) == scale_error(lora, text)


@pytest.mark.parametrize("text", ABSURD)
def test_the_application_layer_refuses_an_absurd_scale(text, tmp_path, tiny_ckpt):
    lora = good_lora(tmp_path)
    spec = editing.parse_lora(f"{lora}:{text}", 1.0)
    assert spec.path == lora  # the suffix was read as the scale, not as part of the file name
    with pytest.raises(UserError) as err:
        editing.resolve_model(str(tiny_ckpt), device="cpu", loras=[spec])
    assert one_line(err) == scale_error(lora, text) and err.value.field == "lora_scale"
    with pytest.raises(UserError, match="the scale of LoRAs given without a scale must be"):
        editing.resolve_model(str(tiny_ckpt), device="cpu", lora_scale=float(text))


def test_the_bound_is_inclusive(tmp_path, tiny_ckpt):
    lora = good_lora(tmp_path)
    specs = [editing.parse_lora(f"{lora}:{MAX_SCALE:g}", 1.0), editing.LoraSpec(lora, -MAX_SCALE)]
    spec = editing.resolve_model(str(tiny_ckpt), device="cpu", loras=specs, lora_scale=-MAX_SCALE)
    assert [s.scale for s in spec.loras] == [100.0, -100.0] and spec.lora_scale == -100.0


@pytest.mark.parametrize("text", ABSURD)
def test_load_lora_refuses_an_absurd_scale_before_reading(text, model, tmp_path):
    lora = good_lora(tmp_path)
    with pytest.raises(UserError) as err:
        load_lora(model, lora, scale=float(text))
    assert one_line(err) == scale_error(lora, text)
    with pytest.raises(UserError, match=re.escape(scale_error("<state dict>", text))):
        load_lora(model, layout_tensors("musubi", DIM), scale=float(text))
    assert list_adapters(model) == []


def test_set_adapters_refuses_an_absurd_scale_and_keeps_the_old_ones(model, tmp_path):
    a = load_lora(model, good_lora(tmp_path, "a.safetensors"), scale=0.5)
    b = load_lora(model, good_lora(tmp_path, "b.safetensors", "wan"), scale=0.25)
    for scales, what, shown in [
        ([1.0, float("nan")], "adapter 'b'", "nan"),
        (float("inf"), "adapter 'a'", "inf"),
        ([1e308, 1.0], "adapter 'a'", "1e+308"),
        ([True, 1.0], "adapter 'a'", "True"),
        (["0.5", 1.0], "adapter 'a'", "'0.5'"),
    ]:
        with pytest.raises(UserError) as err:
            set_adapters(model, [a, b], scales)
        assert one_line(err) == f"the scale of {what} must be a finite number within +-100, got {shown}"
    with pytest.raises(UserError, match="give one scale or a list of scales, got dict"):
        set_adapters(model, [a, b], {"a": 1.0})
    assert active_adapters(model) == {a: 0.5, b: 0.25}
    set_adapters(model, [a, b], [np.float32(100.0), -100])
    assert active_adapters(model) == {a: 100.0, b: -100.0}


def test_pipeline_methods_refuse_an_absurd_scale(tiny_ckpt, tmp_path):
    pipe = ChronoEditPipeline.from_pretrained(tiny_ckpt)
    lora = good_lora(tmp_path)
    with pytest.raises(UserError) as err:
        pipe.load_lora_weights(str(lora), scale=float("nan"))
    assert one_line(err) == scale_error(lora, "nan")
    name = pipe.load_lora_weights(str(lora), scale=0.5)
    with pytest.raises(UserError, match=r"the scale of adapter 'good' must be .* got 1e\+308$"):
        pipe.set_adapters(name, 1e308)
    assert pipe.get_active_adapters() == [name] and active_adapters(pipe.transformer) == {name: 0.5}


# ---------------------------------------------------------------------------------------------------- NaN latents
ARGS = {"prompt": "a red cup", "height": 32, "width": 32, "guidance_scale": 1.0, "output_type": "latent"}


@pytest.fixture
def pipe(tiny_ckpt) -> ChronoEditPipeline:
    pipe = ChronoEditPipeline.from_pretrained(tiny_ckpt)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def poison_call(pipe: ChronoEditPipeline, index: int, value: float) -> list[int]:
    """From its ``index``-th call (from 0) on, the transformer's output is ``value`` everywhere; returns the list its
    calls are counted in (one call per step without guidance)."""
    calls: list[int] = []

    def hook(_module, _args, output):
        calls.append(len(calls))
        if len(calls) - 1 >= index:
            return (torch.full_like(output[0], value), *output[1:])
        return output

    pipe.transformer.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize(
    ("dtype", "value", "remedy"),
    [
        (torch.float32, float("nan"), "check the checkpoint and any LoRA and its scale"),
        (torch.bfloat16, float("inf"), "check the checkpoint and any LoRA and its scale"),
        (torch.float16, float("inf"), "an fp16 overflow? run in bf16 or fp32"),
    ],
    ids=["float32", "bfloat16", "float16"],
)
def test_nan_latents_name_the_step_and_the_dtype(dtype, value, remedy, pipe):
    pipe.transformer.to(dtype)
    calls = poison_call(pipe, 2, value)
    image = Image.new("RGB", (32, 32), (90, 160, 30))
    with pytest.raises(UserError) as err:
        pipe(image=image, num_inference_steps=5, **ARGS)
    name = str(dtype).removeprefix("torch.")
    assert one_line(err) == f"the latents contain NaN or Inf after step 3 of 5 (dtype {name}); {remedy}"
    assert calls == [0, 1, 2]  # stopped at the step that made them


def test_a_lora_that_overflows_is_caught_at_its_first_step(pipe, tmp_path):
    """Finite weights that overflow float32 once multiplied: the run stops at step 1 and does not blame fp16. The LoRA
    is on the output projection, whose infinities reach the latents directly (inside attention, whether a NaN query
    comes out as NaN depends on the CPU's SDPA kernel: some return finite rows)."""
    g = torch.Generator().manual_seed(0)
    out_dim = pipe.transformer.proj_out.out_features
    tensors = {"transformer.proj_out.lora_A.weight": torch.randn(4, DIM, generator=g).sign() * 1e20,
               "transformer.proj_out.lora_B.weight": torch.randn(out_dim, 4, generator=g).sign() * 1e20}  # fmt: skip
    pipe.load_lora_weights(save(tensors, tmp_path / "loud.safetensors"))
    with pytest.raises(UserError) as err:
        pipe(image=Image.new("RGB", (32, 32)), num_inference_steps=3, **ARGS)
    assert one_line(err) == (
        "the latents contain NaN or Inf after step 1 of 3 (dtype float32); check the checkpoint and any LoRA and "
        "its scale"
    )


def test_check_finite_passes_finite_latents():
    check_finite(torch.zeros(2, 3), 0, 1, torch.float16)  # no error
    with pytest.raises(UserError, match=r"after step 1 of 1 \(dtype float16\); an fp16 overflow"):
        check_finite(torch.tensor([0.0, float("-inf")]), 0, 1, torch.float16)


def test_a_named_pipe_is_refused_as_a_lora_file_at_once(tmp_path):
    """A FIFO named as the LoRA would block the reader; it is one line at once."""
    import os

    from chronoedit.lora.formats import read_lora

    fifo = tmp_path / "style.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=f"^cannot read LoRA file {re.escape(str(fifo))}: it is a named pipe, not a "
                                        "regular file$"):
        read_lora(fifo)
