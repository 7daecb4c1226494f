"""Batch preprocessing: uint8 images -> float32 model input, with optional training augmentation.

The normalization choice follows the KernelNorm papers: KernelNorm models see raw ``[0, 1]``
pixels (KernelNorm normalizes its own input windows), every other normalization layer sees
pixels standardized with the dataset's fixed per-channel mean/std.

Augmentation works on whole batches with tensor ops, driven by an explicit ``torch.Generator``,
so it is fast on CPU and a seeded run draws the same crops and flips every time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedkn.data.datasets import ImageDataset

#: Datasets where a mirrored image is still the same class; digits and clothes silhouettes are
#: left unflipped (a mirrored 2 or 7 is not a 2 or 7).
FLIP_DATASETS: frozenset[str] = frozenset({"cifar10", "cifar100"})


class Preprocess:
    """Turn a ``uint8`` batch ``(B, C, H, W)`` into ``float32`` model input.

    Steps: scale to ``[0, 1]``; if ``augment``, random crop after zero-padding by ``padding``
    pixels (zero = black, i.e. padding happens before normalization, as torchvision's
    ``RandomCrop`` before ``Normalize``) and, if also ``flip``, random horizontal flip with
    probability 1/2; finally, if ``normalize``, subtract ``mean`` and divide by ``std``.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        normalize: bool,
        augment: bool = False,
        flip: bool = False,
        padding: int = 4,
    ) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError("mean and std need one entry per channel and std must be positive")
        if padding < 0:
            raise ValueError("padding must be >= 0")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.normalize = normalize
        self.augment = augment
        self.flip = flip
        self.padding = padding

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Preprocess one batch; ``generator`` drives augmentation (``None``: torch's global RNG)."""
        x = images.to(torch.float32) / 255.0  # not in place: never touch the caller's tensor
        if self.augment:
            x = self._augment(x, generator)
        if self.normalize:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x

    def _augment(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # Random draws happen on the generator's (CPU) device; the gathers run wherever x lives.
        b, c, h, w = x.shape
        dev = x.device
        p = self.padding
        if p:
            padded = F.pad(x, (p, p, p, p))
            top = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(dev)
            left = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(dev)
            rows = (top[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
            cols = (left[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
            batch = torch.arange(b, device=dev)[:, None, None, None]
            chans = torch.arange(c, device=dev)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.flip:
            flipped = (torch.rand(b, generator=generator) < 0.5).to(dev)
            x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
        return x

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(normalize={self.normalize}, augment={self.augment}, "
            f"flip={self.flip}, padding={self.padding})"
        )


def preprocess_for(dataset: ImageDataset, *, normalize: bool, augment: bool) -> Preprocess:
    """The standard preprocessing for ``dataset``.

    ``normalize`` should be ``False`` for KernelNorm models and ``True`` otherwise; ``augment``
    is for training batches only. Crop padding is 4 pixels (the CIFAR standard) and 2 for images of
    16 px or less, where 4 would cut away a quarter of the picture; flips only where they keep the
    class (:data:`FLIP_DATASETS`).
    """
    return Preprocess(
        dataset.mean,
        dataset.std,
        normalize=normalize,
        augment=augment,
        flip=dataset.name in FLIP_DATASETS,
        padding=2 if max(dataset.image_size) <= 16 else 4,
    )
