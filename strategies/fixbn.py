"""FixBN (Zhong, Chen & Chao, "Making Batch Normalization Great in Federated Deep Learning", 2023).

The whole rule lives here: the server half (:class:`FixBN`) and the test the clients apply
(:func:`stats_frozen`, which switches :func:`fedkn.train.train_local`'s
``freeze_batchnorm_stats``). With ``R = fixbn-round`` (config; 0 = half of num-rounds):

- **Exploration, rounds 1..R**: exactly FedAvg with BatchNorm (the ``bn`` runs). Clients normalize
  with mini-batch statistics and update their BatchNorm running estimates (PyTorch's exponential
  average, momentum 0.1); the server averages *every* array, the running mean, running variance
  and batch counter included, weighted by the clients' numbers of training examples.
- **The frozen statistics** are therefore the global model's BatchNorm buffers after round R's
  aggregation: per layer and channel, ``mu = sum_k n_k mu_k / sum_k n_k`` and ``var = sum_k n_k
  var_k / sum_k n_k`` over the clients ``k`` sampled in round R, where ``mu_k``/``var_k`` are client
  k's running estimates after its round-R training, which started from the global buffers of round
  R-1. This is the paper's choice (the global model's accumulated statistics, no extra pass over
  data). Note the averaged variance is the mean of the clients' within-client variances; it leaves
  out the spread of the client means.
- **Calibration, rounds R+1..T**: every client trains with each BatchNorm layer normalizing by those
  frozen global statistics (BatchNorm in eval mode: no batch statistics, no running updates),
  while its affine parameters and every convolution keep training. The server averages the
  trained arrays as FedAvg but keeps the global BatchNorm buffers as they were after round R, so
  they do not move, not even by float rounding. Evaluation (global and clients') uses them too.

Not implemented: the paper's optional "maintained local SGD momentum"; clients restart SGD
momentum every round, as under every other fedkn strategy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.serverapp.strategy import FedAvg

from fedkn.config import FederationConfig
from strategies.base import FedknStrategy


def stats_frozen(federation: FederationConfig, server_round: int) -> bool:
    """True when ``server_round`` is a FixBN calibration round (clients train with frozen statistics)."""
    return federation.strategy == "fixbn" and server_round > federation.fixbn_freeze_after


class FixBN(FedknStrategy, FedAvg):
    """FedAvg that, after round ``freeze_after``, keeps the global ``stat_keys`` (BatchNorm buffers) fixed."""

    def __init__(self, *args: Any, stat_keys: Iterable[str], freeze_after: int, **kwargs: Any) -> None:
        stats = frozenset(stat_keys)
        if not stats:
            raise ValueError("FixBN needs the model's BatchNorm statistics keys (see batchnorm_stat_keys); the model has none")
        super().__init__(*args, **kwargs)
        self.stat_keys = stats
        self.freeze_after = int(freeze_after)

    def kept_keys(self, server_round: int) -> frozenset[str]:
        return self.stat_keys if server_round > self.freeze_after else frozenset()
