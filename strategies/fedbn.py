"""FedBN (Li et al., ICLR 2021): BatchNorm layers stay on each client; everything else is FedAvg.

BatchNorm's best-known fix for feature-shifted non-IID clients, so BatchNorm is compared at its
fairest. Which keys stay local and how a client's copy rejoins the global model is
:mod:`fedkn.local_state`; the server side (never send or expect those keys, keep their global
value) is :class:`~strategies.base.FedknStrategy`'s ``local_keys``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.serverapp.strategy import FedAvg

from strategies.base import FedknStrategy


class FedBN(FedknStrategy, FedAvg):
    """FedAvg over every array except ``local_keys`` (the model's BatchNorm state)."""

    def __init__(self, *args: Any, local_keys: Iterable[str], **kwargs: Any) -> None:
        local = frozenset(local_keys)
        if not local:
            raise ValueError("FedBN needs the model's BatchNorm keys (fedkn.local_state.local_keys); the model has none")
        super().__init__(*args, local_keys=local, **kwargs)
