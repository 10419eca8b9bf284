"""Reasoning videos are cached as NVIDIA's full training builds them (``chronoedit_14b_edit_model.py``,
``get_data_and_condition``): 8 latent frames = ``cat(VAE(frames[:25]), VAE([src, tgt x 4])[:, :, 1:])``, the last one
the edit latent a pair of the same images gives; 26-frame (NVIDIA's) and 29-frame videos only, other lengths refused
in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chronoedit.errors import UserError
from chronoedit.media import save_video
from chronoedit.train.cache import CACHE_VERSION, CacheSettings, build_cache, load_entry
from chronoedit.train.data import load_frames, read_dataset

SIZE = 32


def frame(step: int) -> Image.Image:
    """A block sliding one pixel per frame along the diagonal, its colour changing too: every frame differs."""
    image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    image.paste(Image.new("RGB", (12, 12), (255 - 8 * step, 40 + 6 * step, 20)), (step // 2, step // 2))
    return image


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A 26-frame video (25 trajectory frames + the target), a 29-frame video with the same first 25 frames and the
    same target last, and the pair (first frame, target) as two images."""
    folder = tmp_path_factory.mktemp("reasoning")
    trajectory, target = [frame(i) for i in range(25)], frame(30)
    save_video([*trajectory, target], folder / "nv26.mp4")
    save_video([*trajectory, frame(26), frame(27), frame(28), target], folder / "r29.mp4")
    rows = ["key,video,prompt,source_image,target_image", "nv26,nv26.mp4,slide,,", "r29,r29.mp4,slide,,"]
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def cached(data: Path, model: Path, cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    settings = CacheSettings(str(model), SIZE, SIZE, SIZE * SIZE, "float32")
    entries = build_cache(read_dataset(data), cache, settings, torch.device("cpu"), lambda _: None)
    return {entry.spec.key: load_entry(entry) for entry in entries}


def vae_latents(model: Path, frames: list[Image.Image], black: int = 0) -> torch.Tensor:
    """diffusers' AutoencoderKLWan, called here directly on ``frames`` then ``black`` all-zero frames (mid grey in
    [-1, 1], the condition's padding): the normalised posterior mean [16, F_lat, h, w]."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(model, subfolder="vae").eval()
    pixels = np.stack([np.asarray(f, dtype=np.float32) / 127.5 - 1 for f in frames])  # [F, H, W, 3]
    pixels = np.concatenate([pixels, np.zeros((black, *pixels.shape[1:]), dtype=np.float32)])
    video = torch.from_numpy(pixels).permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W]
    with torch.no_grad():
        latent = vae.encode(video).latent_dist.mode()[0]
    mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
    return (latent - mean) / std


@pytest.mark.parametrize("key", ["nv26", "r29"])
def test_a_reasoning_video_is_its_trajectory_latents_then_the_edit_latent(data, tiny_ckpt, tmp_path, key):
    (spec,) = [s for s in read_dataset(data) if s.key == key]
    frames = load_frames(spec)  # as decoded from the mp4
    tensors = cached(data, tiny_ckpt, tmp_path / "cache")[key]
    trajectory = vae_latents(tiny_ckpt, frames[:25])  # [16, 7, 4, 4]
    edit = vae_latents(tiny_ckpt, [frames[0], *[frames[-1]] * 4])  # [16, 2, 4, 4]
    expected = torch.cat([trajectory, edit[:, 1:]], dim=1)
    assert tuple(tensors["latents"].shape) == (16, 8, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(tensors["latents"], expected, atol=1e-5, rtol=1e-5)
    whole = vae_latents(tiny_ckpt, frames[:29] if len(frames) == 29 else [*frames, *[frames[-1]] * 3])
    assert (tensors["latents"][:, -1] - whole[:, -1]).abs().max() > 1e-3  # not the whole clip's last latent
    condition = vae_latents(tiny_ckpt, [frames[0]], black=28)  # 29 pixel frames, as NVIDIA's raw_state
    assert tuple(tensors["condition"].shape) == (16, 8, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(tensors["condition"], condition, atol=1e-5, rtol=1e-5)


def test_the_edit_latent_of_a_reasoning_video_is_the_pairs_last_latent(data, tiny_ckpt, tmp_path):
    (spec,) = [s for s in read_dataset(data) if s.key == "nv26"]
    frames = load_frames(spec)
    pair = tmp_path / "pair"
    pair.mkdir()
    frames[0].save(pair / "s.png")
    frames[-1].save(pair / "t.png")
    (pair / "metadata.csv").write_text("source,target,prompt\ns.png,t.png,slide\n")
    (pair_tensors,) = cached(pair, tiny_ckpt, tmp_path / "cache").values()
    video = cached(data, tiny_ckpt, tmp_path / "cache")["nv26"]
    assert pair_tensors["latents"].shape[1] == 2
    assert torch.equal(video["latents"][:, -1], pair_tensors["latents"][:, -1])
    assert torch.equal(video["latents"][:, 0], pair_tensors["latents"][:, 0])  # the source, as the first latent


@pytest.mark.parametrize("count", [5, 9, 25, 27, 33])
def test_other_lengths_are_refused_in_one_line_naming_the_lengths_that_work(tmp_path, count):
    save_video([frame(i) for i in range(count)], tmp_path / "v.mp4")
    (tmp_path / "metadata.csv").write_text("key,video,prompt\nv,v.mp4,slide\n")
    (spec,) = read_dataset(tmp_path)
    with pytest.raises(UserError) as caught:
        load_frames(spec)
    message = str(caught.value)
    assert "\n" not in message and f"has {count} frames" in message
    assert all(length in message for length in ("use 2", "26", "29"))


def test_caches_of_the_earlier_encoding_are_not_reused(data, tiny_ckpt, tmp_path, monkeypatch):
    """Version 3 encoded a reasoning video as one clip: its files are keyed apart, so they are rebuilt."""
    from chronoedit.train import cache

    settings = CacheSettings(str(tiny_ckpt), SIZE, SIZE, SIZE * SIZE, "float32")
    encoders = cache.encoder_identities(str(tiny_ckpt))
    now = cache.cache_entries(read_dataset(data), tmp_path, settings, encoders)
    monkeypatch.setattr(cache, "CACHE_VERSION", 3)
    before = cache.cache_entries(read_dataset(data), tmp_path, settings, encoders)
    assert CACHE_VERSION == 4
    assert all(a.latents != b.latents for a, b in zip(now, before, strict=True))
