"""``build_strategy(federation, ...)``: the configured Flower strategy with fedkn's additions."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from fedkn.config import FederationConfig
from fedkn.errors import FedknError
from fedkn.protocol import UNIFORM_WEIGHT_KEY
from strategies.base import FedknStrategy
from strategies.fedbn import FedBN
from strategies.fixbn import FixBN


class FedknFedAvg(FedknStrategy, FedAvg):
    """FedAvg (McMahan et al. 2017), weighted by each client's number of training examples."""


class FedknFedProx(FedknStrategy, FedProx):
    """FedProx: FedAvg on the server; clients add (mu/2)||w - w_global||^2 to their loss."""


class FedknFedAvgM(FedknStrategy, FedAvgM):
    """FedAvg with server momentum (Hsu et al. 2019)."""


class FedknFedAdam(FedknStrategy, FedAdam):
    """Adam on the server over the averaged client update (Reddi et al. 2021)."""


def build_strategy(
    federation: FederationConfig,
    *,
    seed: int,
    client_lr: float,
    uniform_weights: bool = False,
    local_keys: Iterable[str] = (),
    stat_keys: Iterable[str] = (),
) -> FedknStrategy:
    """The strategy named by ``federation.strategy``, sampling clients from ``seed``.

    ``client_lr``: the clients' learning rate (FedAdam's ``eta_l``). ``local_keys``: the model's
    BatchNorm keys (FedBN); ``stat_keys``: its BatchNorm statistics keys (FixBN).
    ``uniform_weights``: average with equal weights (each client reports ``UNIFORM_WEIGHT_KEY: 1``),
    as client-level DP's guarantee needs; wrap the result with ``strategies.dp.wrap_strategy``.
    """
    fed = federation
    common = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": fed.min_clients,  # not num-clients: Flower would wait forever for a dead SuperNode
        "min_clients": fed.min_clients,
        "seed": seed,
    }
    if uniform_weights:
        common["weighted_by_key"] = UNIFORM_WEIGHT_KEY
    name = fed.strategy
    if name == "fedavg":
        return FedknFedAvg(**common)
    if name == "fedprox":
        return FedknFedProx(**common, proximal_mu=fed.proximal_mu)
    if name == "fedavgm":
        return FedknFedAvgM(**common, server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum)
    if name == "fedadam":
        return FedknFedAdam(
            **common,
            eta=fed.fedadam_eta,
            eta_l=client_lr,
            beta_1=fed.fedadam_beta1,
            beta_2=fed.fedadam_beta2,
            tau=fed.fedadam_tau,
        )
    if name in ("fedbn", "fixbn"):
        keys = list(local_keys if name == "fedbn" else stat_keys)
        if not keys:
            raise FedknError(f"strategy '{name}' needs a model with BatchNorm layers (norm 'bn')")
        if name == "fedbn":
            return FedBN(**common, local_keys=keys)
        return FixBN(**common, stat_keys=keys, freeze_after=fed.fixbn_freeze_after)
    raise FedknError(f"unknown strategy '{name}'")  # FederationConfig validation makes this unreachable
