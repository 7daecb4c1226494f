"""Model state that never leaves a client, in one place: which keys stay local and how a client's
own copy rejoins the global model it receives.

Under FedBN (Li et al., ICLR 2021; ``FederationConfig.keeps_local_state``) every BatchNorm key stays
on its client: affine parameters, running statistics and batch counter. The server neither sends
nor receives them (``strategies.base.FedknStrategy`` strips them), each client trains and
evaluates the global arrays with its own copy, and the server's global model keeps the initial
values of those keys, so its centralized evaluation is not meaningful: the clients' federated
evaluation stands in for it. No Flower here: the client app, the server app and the tuning's
validation scoring all call these functions.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedkn.config import FederationConfig
from fedkn.nn.batchnorm import batchnorm_keys


def local_keys(federation: FederationConfig, model: nn.Module) -> list[str]:
    """The keys of ``model`` that stay on each client under ``federation``'s strategy; empty when every key is shared."""
    return batchnorm_keys(model) if federation.keeps_local_state else []


def with_local(
    global_state: Mapping[str, torch.Tensor], local: Mapping[str, torch.Tensor], keys: list[str]
) -> dict[str, torch.Tensor]:
    """The global arrays with a client's own ``local`` values for ``keys`` (a new client's are the
    model's initial ones)."""
    return {**global_state, **{k: local[k] for k in keys}}


def split_local(state: Mapping[str, torch.Tensor], keys: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(what the client sends back, what it keeps: detached CPU copies of ``keys``)."""
    kept = set(keys)
    shared = {k: v for k, v in state.items() if k not in kept}
    return shared, {k: state[k].detach().cpu().clone() for k in keys}
