"""Which layers are BatchNorm: the one place that answers it.

FedBN keeps these layers local, FixBN freezes their statistics, DP-SGD rejects them and batch size 1
cannot train them. ``_BatchNorm`` is torch's common base of BatchNorm1d/2d/3d and SyncBatchNorm
(torch offers no public one); the other norms here (GroupNorm, LayerNorm, KernelNorm) are not
subclasses of it.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def batchnorm_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every BatchNorm layer of ``model``, in ``named_modules`` order."""
    return ((name, m) for name, m in model.named_modules() if is_batchnorm(m))


def has_batchnorm(model: nn.Module) -> bool:
    return any(True for _ in batchnorm_modules(model))


def batchnorm_keys(model: nn.Module) -> list[str]:
    """state_dict keys of every BatchNorm module: weight, bias, running_mean/var, num_batches_tracked."""
    return [f"{name}.{k}" if name else k for name, m in batchnorm_modules(model) for k in m.state_dict()]


def batchnorm_stat_keys(model: nn.Module) -> list[str]:
    """state_dict keys of every BatchNorm module's statistics: running_mean/var, num_batches_tracked."""
    return [f"{name}.{k}" if name else k for name, m in batchnorm_modules(model) for k, _ in m.named_buffers(recurse=False)]
