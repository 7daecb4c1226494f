"""``build_strategy(cfg)``: the configured Flower strategy with fedkn's additions."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from fedkn.config import RunConfig
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


def build_strategy(cfg: RunConfig, *, local_keys: Iterable[str] = (), stat_keys: Iterable[str] = ()) -> FedknStrategy:
    """The strategy named by ``cfg.strategy``. ``local_keys``: the model's BatchNorm keys (FedBN);
    ``stat_keys``: its BatchNorm statistics keys (FixBN).

    Under client-level DP the arrays are averaged with equal weights (each client reports
    ``UNIFORM_WEIGHT_KEY: 1``), as the guarantee of ``strategies.dp`` needs; wrap the result with
    ``strategies.dp.wrap_strategy``.
    """
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": cfg.min_clients,  # not num-clients: Flower would wait forever for a dead SuperNode
        "min_clients": cfg.min_clients,
        "seed": cfg.seed,
    }
    if cfg.client_dp != "off":
        common["weighted_by_key"] = UNIFORM_WEIGHT_KEY
    name = cfg.strategy
    if name == "fedavg":
        return FedknFedAvg(**common)
    if name == "fedprox":
        return FedknFedProx(**common, proximal_mu=cfg.proximal_mu)
    if name == "fedavgm":
        return FedknFedAvgM(**common, server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum)
    if name == "fedadam":
        return FedknFedAdam(
            **common,
            eta=cfg.fedadam_eta,
            eta_l=cfg.lr,
            beta_1=cfg.fedadam_beta1,
            beta_2=cfg.fedadam_beta2,
            tau=cfg.fedadam_tau,
        )
    if name == "fedbn":
        keys = list(local_keys)
        if not keys:
            raise FedknError(f"strategy 'fedbn' needs a model with BatchNorm layers (norm 'bn'); norm is '{cfg.norm}'")
        return FedBN(**common, local_keys=keys)
    if name == "fixbn":
        keys = list(stat_keys)
        if not keys:
            raise FedknError(f"strategy 'fixbn' needs a model with BatchNorm layers (norm 'bn'); norm is '{cfg.norm}'")
        return FixBN(**common, stat_keys=keys, freeze_after=cfg.fixbn_freeze_after)
    raise FedknError(f"unknown strategy '{name}'")  # RunConfig validation makes this unreachable
