"""Server strategies for fedkn, built on Flower's own (``flwr.serverapp.strategy``).

``build_strategy(cfg.federation, ...)`` returns FedAvg (default, weighted by examples), FedProx, FedAvgM, FedAdam,
FedBN or FixBN, each with fedkn's deterministic sampling (:mod:`fedkn.sampling`), sorted aggregation, round offset (resume),
byte accounting and error handling (:class:`~strategies.base.FedknStrategy`).
"""

from strategies.base import ClientFailure, FedknStrategy, RoundRecord, to_array_record
from strategies.factory import FedBN, FedknFedAdam, FedknFedAvg, FedknFedAvgM, FedknFedProx, FixBN, build_strategy
from strategies.fixbn import stats_frozen

__all__ = [
    "ClientFailure",
    "FedBN",
    "FedknFedAdam",
    "FedknFedAvg",
    "FedknFedAvgM",
    "FedknFedProx",
    "FedknStrategy",
    "FixBN",
    "RoundRecord",
    "build_strategy",
    "stats_frozen",
    "to_array_record",
]
