"""The embedded default dataset: scikit-learn's 8x8 handwritten digits, upsampled to 16x16.

It is read from inside the installed scikit-learn package, so it works offline and in CI. The
images are upsampled once to 16x16 so the CNNs have room for a few conv/pool stages.
The dataset has no official test split; :func:`load_digits` makes a stratified 80/20 split with a
fixed seed that is independent of any run seed, so the global test set is the same for every run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedkn.cache import WORKER_CACHE

DIGITS_SIZE = 16
DIGITS_TEST_FRACTION = 0.2
#: Fixed on purpose: changing it changes every digits result, so it is not a run option.
DIGITS_SPLIT_SEED = 20240607
DIGITS_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))


@WORKER_CACHE.memo("digits", 1)
def _digits_all() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N,1,16,16), labels int64, train indices, test indices), built once."""
    pixels, target = _read_sklearn_digits()
    raw = torch.from_numpy(pixels.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    # Interpolate in float and quantize once so the stored images are plain uint8 like the rest.
    up = F.interpolate(raw, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = up.round().clamp_(0, 255).to(torch.uint8).numpy()
    labels = target.astype(np.int64)

    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[: round(DIGITS_TEST_FRACTION * len(members))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return images, labels, train_idx, test_idx


def _read_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) in 0..16, labels) from the CSV inside the installed scikit-learn.

    Reading the file directly skips importing ``sklearn.datasets`` (and scipy), which costs every
    process that loads digits, each Ray client actor included, 1-2 s and about 110 MiB. Should a
    scikit-learn release move the file, the public loader is used instead.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        data = np.loadtxt(csv, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1]
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return bunch.images, bunch.target


def load_digits(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images, labels, classes) of the ``"train"`` or ``"test"`` split."""
    images, labels, train_idx, test_idx = _digits_all()
    sel = train_idx if split == "train" else test_idx
    return images[sel], labels[sel], DIGITS_CLASSES


@WORKER_CACHE.memo("digits-stats", 1)
def digits_stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the train split, in [0, 1] pixel units."""
    images, _, _ = load_digits("train")
    pixels = images.astype(np.float64) / 255.0
    return (float(pixels.mean()),), (float(pixels.std()),)
