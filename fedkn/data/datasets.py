"""In-memory image classification datasets.

Every dataset fedkn trains on is small enough to keep whole in memory as one ``uint8`` tensor, so
there is no lazy ``Dataset``/``DataLoader`` machinery: clients index into the tensors directly
(see :mod:`fedkn.data.batches`) and pixels become ``float32`` one batch at a time, which keeps a
simulation with many Flower clients per process cheap in memory.

``digits`` is embedded (it ships inside scikit-learn) and is the default, so fedkn runs and tests
without any download. The others are read from their standard torchvision on-disk layouts and are
never downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedkn.cache import WORKER_CACHE
from fedkn.data import cifar, embedded, idx
from fedkn.errors import FedknError

DATASETS: tuple[str, ...] = ("digits", "mnist", "fmnist", "cifar10", "cifar100")
SPLITS: tuple[str, ...] = ("train", "test")

#: Per-channel (mean, std) of each train split in [0, 1] pixel units. Fixed constants rather than
#: statistics of whatever subset is loaded, so the train and test splits (and every client) are
#: normalized identically. ``digits`` is absent: its statistics come from the embedded train split.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image set held in memory.

    ``images`` stays ``uint8`` (4x smaller than float) and is shared, never copied, by every client
    view of the dataset; treat both tensors as read-only. ``eq=False`` keeps identity comparison,
    since element-wise tensor equality has no single truth value.
    """

    name: str
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, [0, 1] pixel units, from the train split
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        # Catch loader bugs here, once, instead of as shape errors deep inside a training round.
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 of shape ({self.images.shape[0]},), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if not len(self.mean) == len(self.std) == self.images.shape[1]:
            raise ValueError(f"mean/std need one entry per channel ({self.images.shape[1]})")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return (self.images.shape[2], self.images.shape[3])


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load split ``"train"`` or ``"test"`` of dataset ``name`` (one of :data:`DATASETS`).

    ``data_dir`` is where the files are: the directory that torchvision's ``root=`` would be, or
    the directory holding the files themselves. It is ignored for ``digits`` (embedded), optional
    for ``fmnist`` (default: the Debian package ``dataset-fashion-mnist``), and required otherwise.
    Results are cached per process, so callers must not modify the returned tensors in place.
    """
    if name not in DATASETS:
        raise FedknError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if split not in SPLITS:
        raise FedknError(f"unknown split {split!r}; choose 'train' or 'test'.")
    if name == "digits":
        data_dir = None
    return _load_cached(name, split, None if data_dir is None else str(Path(data_dir).expanduser().resolve()))


@WORKER_CACHE.memo("datasets", 8)
def _load_cached(name: str, split: str, data_dir: str | None) -> ImageDataset:
    loader: Callable[[str, str | None], tuple[np.ndarray, np.ndarray, tuple[str, ...]]] = _LOADERS[name]
    images, labels, classes = loader(split, data_dir)
    if name == "digits":
        mean, std = embedded.digits_stats()
    else:
        mean, std = _STATS[name]
    return ImageDataset(
        name=name,
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64, copy=False)),
        classes=classes,
        mean=mean,
        std=std,
    )


_LOADERS: dict[str, Callable[[str, str | None], tuple[np.ndarray, np.ndarray, tuple[str, ...]]]] = {
    "digits": lambda split, _dir: embedded.load_digits(split),
    "mnist": lambda split, data_dir: idx.load_mnist_like("mnist", split, data_dir),
    "fmnist": lambda split, data_dir: idx.load_mnist_like("fmnist", split, data_dir),
    "cifar10": lambda split, data_dir: cifar.load_cifar("cifar10", split, data_dir),
    "cifar100": lambda split, data_dir: cifar.load_cifar("cifar100", split, data_dir),
}
