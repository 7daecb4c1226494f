"""FedBN (Li et al., ICLR 2021): BatchNorm layers stay on each client; everything else is FedAvg.

Each client keeps the affine parameters *and* the running statistics (and batch counter) of every
BatchNorm layer to itself: the server neither sends nor receives them, and averages only the rest,
weighted by examples. This is BatchNorm's best-known fix for feature-shifted non-IID clients, so
BatchNorm is compared at its fairest. The global model's BatchNorm entries keep their initial
values (the server never sees trained ones), so a centralized evaluation of the global model is
not meaningful under FedBN: fedkn reports the clients' federated evaluation instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedkn.nn.batchnorm import batchnorm_modules
from strategies.base import FedknStrategy


def batchnorm_keys(model: nn.Module) -> list[str]:
    """state_dict keys of every BatchNorm module: weight, bias, running_mean/var, num_batches_tracked."""
    keys: list[str] = []
    for name, module in batchnorm_modules(model):
        prefix = f"{name}." if name else ""
        keys.extend(prefix + k for k in module.state_dict())
    return keys


class FedBN(FedknStrategy, FedAvg):
    """FedAvg over every array except ``local_keys`` (the model's BatchNorm state)."""

    def __init__(self, *args: Any, local_keys: Iterable[str], **kwargs: Any) -> None:
        local = frozenset(local_keys)
        if not local:
            raise ValueError("FedBN needs the model's BatchNorm keys (see batchnorm_keys); the model has none")
        super().__init__(*args, local_keys=local, **kwargs)
