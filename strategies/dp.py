"""Client-level DP: Flower 1.41's DP strategy wrappers around a fedkn strategy, and the guarantee.

Client-level DP protects a whole client (all of its data) rather than one example: each sampled
client's model update is clipped to L2 norm ``C`` (on the server, or on the client by a Flower
mod), the server averages the ``m`` clipped updates and adds Gaussian noise of standard deviation
``noise_multiplier * C / m`` (McMahan et al. 2018, "DP-FedAvg"). Modes (:data:`MODES`):

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
from typing import TYPE_CHECKING, Any

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

from fedkn.errors import FedknError
from fedkn.privacy.accounting import check_accountant, check_delta, epsilon
from fedkn.protocol import UNIFORM_WEIGHT_KEY
from strategies.base import FedknStrategy, RoundRecord
from strategies.sampling import sample_size

if TYPE_CHECKING:  # config validation calls into this module
    from fedkn.config import RunConfig

#: Client-level DP modes ("off" = no client-level DP).
MODES: tuple[str, ...] = ("off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
#: fedkn strategies whose aggregate is a plain (uniform) mean of the client models.
AVERAGING_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")
AMPLIFICATION: tuple[str, ...] = ("none", "poisson")
#: Checkpoint key of the current clipping norm (so a resumed adaptive-clipping run goes on from it).
CLIPPING_NORM_STATE = "dp.clipping_norm"


@dataclass(frozen=True)
class ClientDPSettings:
    mode: str = "off"
    noise_multiplier: float = 1.0
    #: Fixed clipping norm; the initial one for the adaptive modes.
    clipping_norm: float = 1.0
    target_clipped_quantile: float = 0.5  # adaptive only
    clip_norm_lr: float = 0.2  # adaptive only
    clipped_count_stddev: float | None = None  # adaptive only; Flower's default: m / 20
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FedknError(f"client-level DP mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (0.0 <= self.noise_multiplier < math.inf):
            raise FedknError(f"client-level DP noise multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not (0.0 < self.clipping_norm < math.inf):
            raise FedknError(f"client-level DP clipping norm must be positive, got {self.clipping_norm!r}")
        if not 0.0 <= self.target_clipped_quantile <= 1.0:
            raise FedknError(f"target clipped quantile must be in [0, 1], got {self.target_clipped_quantile!r}")
        if not self.clip_norm_lr > 0.0:
            raise FedknError(f"clip-norm learning rate must be positive, got {self.clip_norm_lr!r}")
        if self.clipped_count_stddev is not None and self.clipped_count_stddev < 0:
            raise FedknError(f"clipped-count stddev must be >= 0, got {self.clipped_count_stddev!r}")
        check_delta(self.delta)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def adaptive(self) -> bool:
        return self.mode.endswith("adaptive")


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
    strategy: Any, settings: ClientDPSettings, *, num_sampled_clients: int, strategy_name: str = "fedavg"
) -> Any:
    """Wrap ``strategy`` (a fedkn strategy) in Flower's DP wrapper for ``settings.mode``.

    ``num_sampled_clients`` is the number of clients trained per round (the ``m`` in the noise
    ``noise_multiplier * C / m``; ``strategies.sample_size(num_clients, fraction_train)``).
    ``strategy_name`` is the config's strategy; only plain averaging keeps the guarantee.
    Returns ``strategy`` unchanged when the mode is ``off``.
    """
    if not settings.enabled:
        return strategy
    check_strategy(strategy_name)
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
    check_adaptive(s, num_sampled_clients)
    cls = FedknDPServerAdaptive if s.mode == "server-adaptive" else FedknDPClientAdaptive
    return cls(strategy, s.noise_multiplier, num_sampled_clients, s.clipping_norm,
               s.target_clipped_quantile, s.clip_norm_lr, s.clipped_count_stddev)


def check_adaptive(settings: ClientDPSettings, num_sampled_clients: int) -> None:
    """Flower's condition for adaptive clipping: the clipped-count noise must exceed noise_multiplier / 2."""
    s = settings
    stddev = s.clipped_count_stddev if s.clipped_count_stddev is not None else num_sampled_clients / 20
    if s.adaptive and s.noise_multiplier > 0 and s.noise_multiplier >= 2 * stddev:
        raise FedknError(
            f"adaptive clipping with client-dp-noise-multiplier {s.noise_multiplier:g} needs a client-dp-count-stddev "
            f"above {s.noise_multiplier / 2:g} (it is {stddev:g}; the default 0 means clients per round / 20); "
            "set it higher, lower the noise multiplier or sample more clients per round"
        )


def settings_from_config(cfg: RunConfig) -> ClientDPSettings:
    """:class:`ClientDPSettings` from a RunConfig's ``client-dp*`` keys (``client-dp-count-stddev``
    0 = Flower's default, clients per round / 20). Also rejects strategies that break the guarantee
    and adaptive settings Flower would refuse, so config validation can call it."""
    stddev = cfg.client_dp_count_stddev
    settings = ClientDPSettings(
        mode=cfg.client_dp,
        noise_multiplier=cfg.client_dp_noise_multiplier,
        clipping_norm=cfg.client_dp_clipping_norm,
        target_clipped_quantile=cfg.client_dp_target_quantile,
        clip_norm_lr=cfg.client_dp_clip_lr,
        clipped_count_stddev=stddev if stddev > 0 else None,
        delta=cfg.client_dp_delta,
    )
    if settings.enabled:
        check_strategy(cfg.strategy)
    check_adaptive(settings, sample_size(cfg.num_clients, cfg.fraction_train))
    return settings


def check_strategy(strategy_name: str) -> None:
    """Client-level DP's guarantee holds only for a plain (uniform) mean of the client models."""
    if strategy_name not in AVERAGING_STRATEGIES:
        raise FedknError(
            f"client-level DP needs strategy {' or '.join(AVERAGING_STRATEGIES)} (plain averaging); "
            f"strategy '{strategy_name}' changes the aggregate after averaging or keeps layers local"
        )


def client_mod(mode: str) -> Callable[..., Any] | None:
    """The Flower mod a client-side mode needs around the ClientApp's train handler, else None.

    A mod is ``mod(msg, context, call_next) -> Message``; apply it to train messages only.
    """
    if mode not in MODES:
        raise FedknError(f"client-level DP mode must be one of {', '.join(MODES)}, got {mode!r}")
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
    "AVERAGING_STRATEGIES",
    "MODES",
    "UNIFORM_WEIGHT_KEY",
    "ClientDPGuarantee",
    "ClientDPSettings",
    "FedknDPClientAdaptive",
    "FedknDPClientFixed",
    "FedknDPServerAdaptive",
    "FedknDPServerFixed",
    "check_adaptive",
    "client_level_guarantee",
    "client_mod",
    "settings_from_config",
    "wrap_strategy",
]
