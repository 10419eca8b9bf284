"""The defaults follow NVIDIA's recipes: LoRA runs as DiffSynth trains (σ one of the 1000 shifted training timesteps,
uniformly; the loss weighted by its bell curve), full runs as the base model was trained (logit-normal σ, uniform
weight, 20% of captions replaced by the empty prompt); a 720x1280 training area that never upscales."""

from __future__ import annotations

import math

import pytest
import torch

from chronoedit.train import TrainConfig
from chronoedit.train import dataset as dataset_module
from chronoedit.train.config import build_config
from chronoedit.train.data import training_size
from chronoedit.train.dataset import Noising, StepDataset
from chronoedit.train.flow import loss_weights, sample_sigmas

REQUIRED = {"model_path": "m", "dataset": "d"}


def diffsynth_grid(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffSynth's FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True).set_timesteps(1000, training=True),
    written out: (timesteps [1000], linear_timesteps_weights [1000])."""
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    y = torch.exp(-2 * ((timesteps - 1000 / 2) / 1000) ** 2)
    y_shifted = y - y.min()
    return timesteps, y_shifted * (1000 / y_shifted.sum())


def test_defaults_follow_the_mode():
    lora, full = build_config({}, REQUIRED), build_config({}, {**REQUIRED, "mode": "full"})
    assert (lora.sampling, lora.weighting, lora.dropout) == ("uniform_steps", "bell", 0.0)
    assert (full.sampling, full.weighting, full.dropout) == ("logit_normal", "uniform", 0.2)
    assert lora.max_area == full.max_area == 720 * 1280
    given = build_config({}, {**REQUIRED, "mode": "full", "timestep_sampling": "uniform", "loss_weighting": "bell",
                              "caption_dropout": 0.0})  # fmt: skip
    assert (given.sampling, given.weighting, given.dropout) == ("uniform", "bell", 0.0)


BAD = [("loss_weighting", "triangle"), ("caption_dropout", 1.5), ("caption_dropout", math.nan),
       ("timestep_sampling", "normal")]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), BAD)
def test_bad_recipe_values_name_the_setting(key, value):
    from chronoedit.errors import UserError

    with pytest.raises(UserError) as caught:
        build_config({}, {**REQUIRED, key: value})
    assert caught.value.field == key


@pytest.mark.parametrize("shift", [5.0, 3.0])
def test_bell_weights_are_diffsynths_at_every_training_timestep(shift):
    timesteps, weights = diffsynth_grid(shift)
    ours = loss_weights(timesteps / 1000, shift, "bell")
    torch.testing.assert_close(ours, weights, atol=2e-5, rtol=1e-5)
    assert ours[0] == 0  # σ = 1: pure noise carries no loss
    assert ours.double().mean() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(loss_weights(timesteps / 1000, shift, "uniform"), torch.ones(1000))


def test_uniform_steps_draws_the_training_timesteps_uniformly():
    timesteps, _ = diffsynth_grid(5.0)
    sigma = sample_sigmas(20000, torch.Generator().manual_seed(0), 5.0, "uniform_steps")
    nearest = (sigma[:, None] * 1000 - timesteps[None]).abs().min(dim=1).values
    assert nearest.max() < 1e-3  # on the grid
    assert sigma.max() == 1.0  # σ = 1 included, as DiffSynth
    step = torch.round(1000 - 1000 * sigma / (5 - 4 * sigma)).long()  # unshift: k = 1000 (1 - σ)
    counts = torch.bincount(step, minlength=1000)[:1000]
    assert counts.float().mean() == 20 and counts.max() < 50  # uniform over the 1000 steps


@pytest.fixture
def items(monkeypatch):
    """StepDataset items over 3 fake cached samples (load_entry replaced): (dataset, empty prompt)."""

    def fake_entry(entry: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(entry)
        shapes = {"prompt_embeds": (512, 8), "image_embeds": (257, 4), "latents": (16, 2, 2, 2),
                  "condition": (16, 2, 2, 2)}  # fmt: skip
        return {key: torch.randn(*shape, generator=gen) for key, shape in shapes.items()}

    monkeypatch.setattr(dataset_module, "load_entry", fake_entry)
    empty = torch.full((512, 8), 0.5)

    def make(dropout: float) -> StepDataset:
        noising = Noising(5.0, "logit_normal", caption_dropout=dropout, empty_prompt=empty)
        return StepDataset([0, 1, 2], 3000, 7, noising)

    return make, empty, fake_entry


def test_caption_dropout_replaces_a_fifth_of_captions_by_the_empty_prompt_and_nothing_else(items):
    make, empty, fake_entry = items
    dropped, kept = make(0.2), make(0.0)
    hits = 0
    for index in range(0, 3000, 3):
        item, plain = dropped[index], kept[index]
        original = fake_entry(dropped.sample_index(index))
        is_empty = torch.equal(item["prompt_embeds"], empty)
        hits += is_empty
        assert is_empty or torch.equal(item["prompt_embeds"], original["prompt_embeds"])
        for key in ("image_embeds", "condition", "latents", "noise", "sigma"):  # never dropped, same noise
            assert torch.equal(item[key], plain[key])
        assert torch.equal(plain["prompt_embeds"], original["prompt_embeds"])
    assert 0.15 < hits / 1000 < 0.25
    again = make(0.2)
    assert all(torch.equal(again[i]["prompt_embeds"], dropped[i]["prompt_embeds"]) for i in range(0, 300, 7))


def test_the_training_area_never_upscales():
    assert training_size((100, 60), None, None, 720 * 1280) == (96, 48)  # kept, cut to multiples of 16
    assert training_size((1920, 1080), None, None, 720 * 1280) == (1280, 720)
    assert training_size((4000, 4000), None, None, 720 * 1280) == (960, 960)
    assert training_size((100, 60), 32, 64, 720 * 1280) == (64, 32)  # an explicit size is the size


def test_each_recipe_setting_is_a_flag(capsys):
    from chronoedit import cli

    assert cli.main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--timestep-sampling", "--loss-weighting", "--caption-dropout", "--max-area"):
        assert flag in text
    assert "default 720*1280" in text and "default 0.2 for full" in text
    assert TrainConfig().timestep_sampling is None  # resolved by the mode
