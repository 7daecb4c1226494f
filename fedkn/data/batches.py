"""Mini-batches straight from in-memory tensors.

A client's data is an index array into a shared :class:`~fedkn.data.datasets.ImageDataset`, so a
batch is one fancy-index gather plus :class:`~fedkn.data.transforms.Preprocess`. This avoids
``DataLoader`` worker processes, which cost more than they save for datasets already in memory
and would multiply under a Flower simulation with many clients per machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from fedkn.data.datasets import ImageDataset
from fedkn.errors import FedknError

#: ``(uint8 images, generator) -> float32 model input``; :class:`~fedkn.data.transforms.Preprocess` is one.
PreprocessFn = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


def iterate_batches(
    dataset: ImageDataset,
    indices: np.ndarray | torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    preprocess: PreprocessFn,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs float32 (B, C, H, W), labels int64 (B,))`` over ``dataset[indices]``.

    ``generator`` drives both the shuffle order and the augmentation in ``preprocess``, so one
    seeded generator per client and round makes local training reproducible; ``None`` uses torch's
    global RNG. ``drop_last`` drops a final short batch (useful when a normalization layer cannot
    handle a batch of one); an index set smaller than ``batch_size`` then yields nothing.
    """
    if batch_size < 1:
        raise FedknError(f"batch size must be at least 1, got {batch_size}.")
    order = torch.as_tensor(indices, dtype=torch.int64)
    if order.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {tuple(order.shape)}")
    # Checked here, not in the generator, so bad arguments fail at the call and not at first use.
    return _batches(dataset, order, batch_size, shuffle, generator, preprocess, drop_last)


def _batches(
    dataset: ImageDataset,
    order: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    preprocess: PreprocessFn,
    drop_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if shuffle:
        order = order[torch.randperm(order.numel(), generator=generator)]
    n = order.numel()
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        batch = order[start : start + batch_size]
        yield preprocess(dataset.images[batch], generator), dataset.labels[batch]
