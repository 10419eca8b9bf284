"""Aspect-ratio buckets: a fixed set of sizes at the training area (multiples of 16), each sample sized as the
bucket nearest its aspect ratio, each batch from one bucket, in an order that is a pure function of (seed, epoch)."""

from __future__ import annotations

import pytest
import torch

from chronoedit.train import dataset as dataset_module
from chronoedit.train.data import bucket_sizes, training_size
from chronoedit.train.dataset import Noising, StepDataset

AREA = 720 * 1280


def test_buckets_are_a_fixed_set_of_multiples_of_16_at_the_area():
    buckets = bucket_sizes(AREA)
    assert (1280, 720) in buckets and (720, 1280) in buckets and (960, 960) in buckets
    assert all(w % 16 == 0 and h % 16 == 0 and 0.9 * AREA <= w * h <= AREA for w, h in buckets)
    assert len(buckets) == 11


@pytest.mark.parametrize(("size", "bucket"), [((1920, 1080), (1280, 720)), ((1800, 1000), (1280, 720)),
                                              ((3000, 3100), (960, 960)), ((1000, 1500), (784, 1168))])  # fmt: skip
def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio(size, bucket):
    assert training_size(size, None, None, AREA, buckets=True) == bucket
    assert training_size((300, 200), None, None, AREA, buckets=True) == (288, 192)  # smaller: never upscaled


@pytest.fixture
def shapes(monkeypatch):
    """Fake cached samples: entry i is its latent shape (load_entry and latent_shape replaced)."""
    monkeypatch.setattr(dataset_module, "latent_shape", lambda entry: entry)
    monkeypatch.setattr(dataset_module, "load_entry", lambda entry: {"latents": torch.zeros(entry),
                                                                     "prompt_embeds": torch.zeros(4, 2)})  # fmt: skip
    square, wide, video = (16, 2, 4, 4), (16, 2, 4, 8), (16, 8, 4, 4)
    return [square] * 5 + [wide] * 3 + [video] * 2


def stream(entries, batch_size: int, seed: int = 3) -> StepDataset:
    return StepDataset(entries, 10_000, seed, Noising(5.0, "uniform"), batch_size)


def test_every_batch_is_one_bucket_and_every_sample_is_seen_each_epoch(shapes):
    data = stream(shapes, 2)
    assert data.epoch_length == 2 * (3 + 2 + 1)  # ceil(5/2) + ceil(3/2) + ceil(2/2) batches
    for epoch in range(4):
        order = data.epoch_order(epoch)
        batches = [order[k : k + 2] for k in range(0, len(order), 2)]
        assert all(len({shapes[i] for i in batch}) == 1 for batch in batches)
        assert set(order) == set(range(len(shapes)))
    assert data.epoch_order(0) != data.epoch_order(1)  # reshuffled each epoch


def test_the_order_is_a_pure_function_of_seed_and_index(shapes):
    first, again, other = stream(shapes, 2), stream(shapes, 2), stream(shapes, 2, seed=4)
    indices = [first.sample_index(i) for i in range(200)]
    assert [again.sample_index(i) for i in reversed(range(200))] == indices[::-1]  # any order of asking
    assert [other.sample_index(i) for i in range(200)] != indices


def test_batches_of_one_keep_the_plain_permutation(shapes):
    data = stream(shapes, 1)
    expected = torch.randperm(len(shapes), generator=torch.Generator().manual_seed(3 * 1_000_003 + 2)).tolist()
    assert data.epoch_order(2) == expected and data.epoch_length == len(shapes)
