"""Preprocess (normalization, vectorized augmentation) and iterate_batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedkn.data.batches import iterate_batches
from fedkn.data.datasets import ImageDataset, load_dataset
from fedkn.data.transforms import Preprocess, preprocess_for
from fedkn.errors import FedknError


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_dataset("digits")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_kernelnorm_path_gives_raw_unit_pixels(digits: ImageDataset) -> None:
    x = preprocess_for(digits, normalize=False, augment=False)(digits.images[:64])
    assert x.dtype == torch.float32 and x.shape == (64, 1, 16, 16)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.allclose(x * 255, digits.images[:64].float())


def test_normalized_path_is_standardized(digits: ImageDataset) -> None:
    x = preprocess_for(digits, normalize=True, augment=False)(digits.images)
    assert abs(float(x.mean())) < 1e-3 and float(x.std()) == pytest.approx(1.0, abs=1e-2)


def test_random_crop_matches_a_per_sample_reference() -> None:
    images = torch.randint(0, 256, (9, 3, 8, 8), dtype=torch.uint8)
    pre = Preprocess((0.5,) * 3, (0.25,) * 3, normalize=False, augment=True, padding=2)
    out = pre(images, _gen(0))
    g = _gen(0)  # replay the draws: tops, then lefts
    tops, lefts = torch.randint(0, 5, (9,), generator=g), torch.randint(0, 5, (9,), generator=g)
    padded = F.pad(images.float() / 255, (2, 2, 2, 2))
    for i in range(9):
        assert torch.equal(out[i], padded[i, :, tops[i] : tops[i] + 8, lefts[i] : lefts[i] + 8])


def test_flip_mirrors_some_images_and_keeps_the_rest() -> None:
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = Preprocess((0.5,) * 3, (0.25,) * 3, normalize=False, augment=True, flip=True, padding=0)(images, _gen(1))
    x = images.float() / 255
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert torch.all(same | mirrored) and 10 < int(mirrored.sum()) < 54


def test_augmentation_is_deterministic_under_a_seeded_generator(digits: ImageDataset) -> None:
    pre = preprocess_for(digits, normalize=True, augment=True)
    a, b, c = pre(digits.images[:32], _gen(5)), pre(digits.images[:32], _gen(5)), pre(digits.images[:32], _gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_preprocess_choices_per_dataset(digits: ImageDataset) -> None:
    pre = preprocess_for(digits, normalize=True, augment=True)
    assert (pre.padding, pre.flip) == (2, False)
    cifar = ImageDataset("cifar10", torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64),
                         tuple("abcdefghij"), (0.5,) * 3, (0.25,) * 3)
    pre = preprocess_for(cifar, normalize=True, augment=True)
    assert (pre.padding, pre.flip) == (4, True)


def test_batches_cover_indices_once_in_order(digits: ImageDataset) -> None:
    indices = np.arange(5, 105, 3)
    pre = preprocess_for(digits, normalize=False, augment=False)
    batches = list(iterate_batches(digits, indices, 8, shuffle=False, generator=None, preprocess=pre))
    assert [len(y) for _, y in batches] == [8, 8, 8, 8, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), digits.labels[indices])
    assert torch.equal(torch.cat([x for x, _ in batches]), digits.images[indices].float() / 255)


def test_shuffle_is_seeded_and_drop_last_drops_the_short_batch(digits: ImageDataset) -> None:
    pre = preprocess_for(digits, normalize=True, augment=True)
    indices = np.arange(50)

    def labels(seed: int, drop_last: bool) -> list[torch.Tensor]:
        batches = iterate_batches(
            digits, indices, 16, shuffle=True, generator=_gen(seed), preprocess=pre, drop_last=drop_last
        )
        return [y for _, y in batches]

    first, again = labels(0, False), labels(0, False)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(torch.cat(first), digits.labels[indices])  # order changed
    assert [len(y) for y in labels(0, True)] == [16, 16, 16]


def test_batch_size_one_and_empty_and_invalid(digits: ImageDataset) -> None:
    pre = preprocess_for(digits, normalize=True, augment=True)
    batches = list(iterate_batches(digits, np.array([3, 1, 2]), 1, shuffle=True, generator=_gen(0), preprocess=pre))
    assert [tuple(x.shape) for x, _ in batches] == [(1, 1, 16, 16)] * 3
    empty = np.array([], dtype=np.int64)
    assert list(iterate_batches(digits, empty, 4, shuffle=True, generator=_gen(0), preprocess=pre)) == []
    short = iterate_batches(digits, np.arange(3), 4, shuffle=False, generator=None, preprocess=pre, drop_last=True)
    assert list(short) == []
    with pytest.raises(FedknError, match="at least 1"):
        iterate_batches(digits, np.arange(3), 0, shuffle=False, generator=None, preprocess=pre)
