"""Client-level DP: Flower 1.41's DP strategy wrappers around a fedkn strategy, and the guarantee.

Client-level DP protects a whole client (all of its data) rather than one example: each sampled
client's model update is clipped to L2 norm ``C`` (on the server, or on the client by a Flower
mod), the server averages the ``m`` clipped updates and adds Gaussian noise of standard deviation
``noise_multiplier * C / m`` (McMahan et al. 2018, "DP-FedAvg"). Modes (:data:`fedkn.config.CLIENT_DP_MODES`):

- ``server-fixed``: :class:`DifferentialPrivacyServerSideFixedClipping` (the server clips).
- ``client-fixed``: :class:`DifferentialPrivacyClientSideFixedClipping` + ``fixedclipping_mod``
  on the client (the client clips; the server never sees an unclipped update).
- ``server-adaptive`` / ``client-adaptive``: the adaptive-clipping wrappers (+
  ``adaptiveclipping_mod``), which move ``C`` towards the ``target_clipped_quantile`` of update
  norms (Andrew et al. 2021). ``clipping_norm`` is then the *initial* clipping norm.

The wrappers here are Flower's classes with three additions: fedkn's strategy API (``records``,
``bind``, ``num_partitions``) passes on to the wrapped fedkn strategy, a client error stops the
run as it does without DP (Flower's wrappers would skip the round), and the checkpointed strategy
state includes the clipping norm (which adaptive clipping changes every round).

**The guarantee** (:func:`client_level_guarantee`), and what it assumes:

- Neighbouring federations differ by adding or removing one client's entire dataset.
- Each round is a Gaussian mechanism with noise multiplier ``noise_multiplier`` on the *unweighted*
  mean of ``m`` clipped updates (sensitivity ``C/m``). That holds only if the inner strategy
  averages with equal weights (FedAvg/FedProx with ``weighted_by_key=UNIFORM_WEIGHT_KEY``, each
  client reporting ``{UNIFORM_WEIGHT_KEY: 1}``) and adds nothing after averaging; server
  optimizers (FedAvgM, FedAdam) and FedBN are therefore rejected. If fewer than ``m`` clients
  reply in a round, that round's guarantee is weaker than stated (Flower logs a warning).
- Adaptive clipping: ``noise_multiplier`` is the *total* noise multiplier; Flower splits it into
  noise on the update and on the clipped-count estimate so that the pair has the same guarantee
  as fixed clipping with ``noise_multiplier`` (Andrew et al. 2021, Thm. 1).
- Composition over ``rounds`` rounds with an Opacus accountant. ``amplification="none"``
  (default) credits nothing for client sampling: valid however clients are sampled (this is also
  what Flower's own accounted mode requires). ``"poisson"`` credits sampling rate ``m/N``, which
  assumes each client joins each round independently with probability ``m/N``; fedkn, like Flower,
  samples exactly ``m`` clients without replacement, so this figure is an approximation.
- Covered: the global models (and anything computed from them). Not covered: the metrics clients
  report in the clear (train loss/accuracy, number of examples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedkn.config import CLIENT_DP_MODES, ClientDPConfig, check_client_dp_strategy
from fedkn.errors import FedknError
from fedkn.privacy.accounting import check_accountant, epsilon
from fedkn.protocol import UNIFORM_WEIGHT_KEY
from strategies.base import FedknStrategy, RoundRecord

AMPLIFICATION: tuple[str, ...] = ("none", "poisson")
#: Checkpoint key of the current clipping norm (so a resumed adaptive-clipping run goes on from it).
CLIPPING_NORM_STATE = "dp.clipping_norm"


class _FedknDP(Strategy):
    """Mixin placed before a Flower DP wrapper: fedkn's strategy API (what the server app uses)
    passed on to the wrapped fedkn strategy, which Flower's wrapper keeps as ``strategy``."""

    strategy: FedknStrategy

    @property
    def records(self) -> dict[int, RoundRecord]:
        return self.strategy.records

    @property
    def num_partitions(self) -> int:
        return self.strategy.num_partitions

    def bind(self, partition_of: Mapping[int, int], *, round_offset: int = 0) -> None:
        self.strategy.bind(partition_of, round_offset=round_offset)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        # A client error stops the run with its own line, as without DP (Flower's wrapper would skip the round).
        self.strategy.check_replies(replies, server_round + self.strategy.round_offset, "train")
        return super().aggregate_train(server_round, replies)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The wrapped strategy's state plus the clipping norm (adaptive clipping moves it), for checkpoints."""
        return {**self.strategy.state_dict(), CLIPPING_NORM_STATE: np.asarray(float(self.clipping_norm))}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        state = dict(state)
        if CLIPPING_NORM_STATE in state:
            self.clipping_norm = float(np.asarray(state.pop(CLIPPING_NORM_STATE)).item())
        self.strategy.load_state_dict(state)


class FedknDPServerFixed(_FedknDP, DifferentialPrivacyServerSideFixedClipping):
    """Server-side fixed clipping + central Gaussian noise."""


class FedknDPClientFixed(_FedknDP, DifferentialPrivacyClientSideFixedClipping):
    """Client-side fixed clipping (``fixedclipping_mod``) + central Gaussian noise."""


class FedknDPServerAdaptive(_FedknDP, DifferentialPrivacyServerSideAdaptiveClipping):
    """Server-side adaptive clipping + central Gaussian noise."""


class FedknDPClientAdaptive(_FedknDP, DifferentialPrivacyClientSideAdaptiveClipping):
    """Client-side adaptive clipping (``adaptiveclipping_mod``) + central Gaussian noise."""


def wrap_strategy(
    strategy: Any, settings: ClientDPConfig, *, num_sampled_clients: int, strategy_name: str = "fedavg"
) -> Any:
    """Wrap ``strategy`` (a fedkn strategy) in Flower's DP wrapper for ``settings.mode``.

    ``num_sampled_clients`` is the number of clients trained per round (the ``m`` in the noise
    ``noise_multiplier * C / m``; ``RunConfig.clients_per_round``).
    ``strategy_name`` is the config's strategy; only plain averaging keeps the guarantee.
    Returns ``strategy`` unchanged when the mode is ``off``.
    """
    if not settings.enabled:
        return strategy
    check_client_dp_strategy(strategy_name)
    key = getattr(strategy, "weighted_by_key", None)
    if key != UNIFORM_WEIGHT_KEY:
        raise FedknError(
            f"client-level DP needs equal client weights: build the strategy with weighted_by_key="
            f"'{UNIFORM_WEIGHT_KEY}' and have clients report {{'{UNIFORM_WEIGHT_KEY}': 1}} (it weighs by '{key}')"
        )
    if num_sampled_clients < 1:
        raise FedknError(f"client-level DP needs at least one sampled client per round, got {num_sampled_clients}")
    s = settings
    if s.mode == "server-fixed":
        return FedknDPServerFixed(strategy, s.noise_multiplier, s.clipping_norm, num_sampled_clients)
    if s.mode == "client-fixed":
        return FedknDPClientFixed(strategy, s.noise_multiplier, s.clipping_norm, num_sampled_clients)
    s.check_adaptive(num_sampled_clients)
    cls = FedknDPServerAdaptive if s.mode == "server-adaptive" else FedknDPClientAdaptive
    return cls(strategy, s.noise_multiplier, num_sampled_clients, s.clipping_norm,
               s.target_quantile, s.clip_lr, s.count_stddev if s.count_stddev > 0 else None)


def client_mod(mode: str) -> Callable[..., Any] | None:
    """The Flower mod a client-side mode needs around the ClientApp's train handler, else None.

    A mod is ``mod(msg, context, call_next) -> Message``; apply it to train messages only.
    """
    if mode not in CLIENT_DP_MODES:
        raise FedknError(f"client-level DP mode must be one of {', '.join(CLIENT_DP_MODES)}, got {mode!r}")
    return {"client-fixed": fixedclipping_mod, "client-adaptive": adaptiveclipping_mod}.get(mode)


@dataclass(frozen=True)
class ClientDPGuarantee:
    epsilon: float
    delta: float
    rounds: int
    noise_multiplier: float
    sample_rate: float  # credited client sampling rate (1.0 without amplification)
    amplification: str
    accountant: str

    @property
    def statement(self) -> str:
        eps = "no finite epsilon (no noise)" if math.isinf(self.epsilon) else f"epsilon = {self.epsilon:.3g}"
        amp = ("no credit for client sampling" if self.amplification == "none"
               else f"Poisson client sampling at rate {self.sample_rate:.3g} assumed")
        return (
            f"client-level ({eps}, delta = {self.delta:g})-DP for the released global models after "
            f"{self.rounds} rounds (noise multiplier {self.noise_multiplier:g}, {self.accountant} accountant, {amp}; "
            "add/remove one client; reported client metrics are not covered)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "statement": self.statement}


def client_level_guarantee(
    noise_multiplier: float,
    num_sampled_clients: int,
    num_clients: int,
    rounds: int,
    delta: float,
    *,
    accountant: str = "rdp",
    amplification: str = "none",
) -> ClientDPGuarantee:
    """Client-level ``(epsilon, delta)`` after ``rounds`` rounds (assumptions: module docstring)."""
    check_accountant(accountant)
    if amplification not in AMPLIFICATION:
        raise FedknError(f"amplification must be one of {', '.join(AMPLIFICATION)}, got {amplification!r}")
    if not 1 <= num_sampled_clients <= num_clients:
        raise FedknError(f"sampled clients must be in 1..{num_clients}, got {num_sampled_clients}")
    if rounds < 0:
        raise FedknError(f"rounds must be >= 0, got {rounds}")
    q = num_sampled_clients / num_clients if amplification == "poisson" else 1.0
    eps = epsilon([(noise_multiplier, q, rounds)], delta, accountant)
    return ClientDPGuarantee(eps, float(delta), int(rounds), float(noise_multiplier), q, amplification, accountant)


__all__ = [
    "AMPLIFICATION",
    "UNIFORM_WEIGHT_KEY",
    "ClientDPGuarantee",
    "FedknDPClientAdaptive",
    "FedknDPClientFixed",
    "FedknDPServerAdaptive",
    "FedknDPServerFixed",
    "client_level_guarantee",
    "client_mod",
    "wrap_strategy",
]
