"""Privacy accounting for DP-SGD on each client: epsilon per round and cumulative, via Opacus.

Everything here is a thin layer over Opacus' accountants (``rdp``: Rényi DP of the sampled
Gaussian mechanism, Mironov et al. 2019; ``prv``: privacy random variables, Gopi et al. 2021, a
tighter numerical bound; ``gdp``: Gaussian DP via the CLT, Bu et al. 2020, experimental and able to
*under*-estimate epsilon). The numbers are exactly Opacus' for the same history: an Opacus
accountant stepped ``steps`` times with ``(noise_multiplier, sample_rate)`` holds the history
``[(noise_multiplier, sample_rate, steps)]``, and that is what :func:`epsilon` hands it.

**What a client's epsilon means.** Sample-level DP for one client's *local training data*:
neighbouring datasets differ by adding or removing one example of that client (Opacus'
convention, matching Poisson sampling), and the released outputs are the model updates the
client sends. Because clients' datasets are disjoint, each client has its own guarantee
(parallel composition); a run's figure is the maximum over clients.

- *Per-round epsilon* of client ``k`` in round ``t``: the DP-SGD steps ``k`` ran in round ``t``
  alone (``steps`` steps at noise ``sigma_k`` and sampling rate ``q_k``).
- *Cumulative epsilon* of client ``k`` after round ``t``: all DP-SGD steps ``k`` ran in the rounds
  ``<= t`` **in which it was sampled to train**, composed with the chosen accountant. Rounds in
  which ``k`` did not train do not touch its data and cost nothing. No amplification by client
  sampling is credited (conservative: a client that trains in every round gets the same number).
  With fixed settings the cumulative epsilon after ``m`` participations is the epsilon of
  ``m * steps`` steps.

:class:`PrivacyLedger` keeps one client's history (serializable, for Flower's ``context.state``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedkn.cache import WORKER_CACHE
from fedkn.errors import FedknError

#: Opacus accountant mechanisms fedkn offers.
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "gdp")

#: ``(noise_multiplier, sample_rate, steps)``, Opacus' history entry.
Entry = tuple[float, float, int]


def check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise FedknError(f"DP accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    return name


def check_delta(delta: float) -> float:
    if not (isinstance(delta, (int, float)) and 0.0 < float(delta) < 1.0):
        raise FedknError(f"DP delta must be in (0, 1), e.g. 1e-5 (below 1/dataset size), got {delta!r}")
    return float(delta)


def _check_entry(sigma: float, q: float, steps: int) -> Entry:
    if not (sigma >= 0.0 and math.isfinite(sigma)):
        raise FedknError(f"noise multiplier must be a finite number >= 0, got {sigma!r}")
    if not 0.0 < q <= 1.0:
        raise FedknError(f"sampling rate must be in (0, 1], got {q!r}")
    if int(steps) != steps or steps < 0:
        raise FedknError(f"number of steps must be a non-negative integer, got {steps!r}")
    return float(sigma), float(q), int(steps)


def compact(history: Iterable[Sequence[float]]) -> list[Entry]:
    """Merge consecutive entries with equal ``(noise_multiplier, sample_rate)``; drop 0-step ones.

    This is what Opacus' own accountants do when stepped one step at a time.
    """
    out: list[Entry] = []
    for sigma, q, steps in history:
        entry = _check_entry(float(sigma), float(q), steps)
        if entry[2] == 0:
            continue
        if out and out[-1][:2] == entry[:2]:
            out[-1] = (entry[0], entry[1], out[-1][2] + entry[2])
        else:
            out.append(entry)
    return out


def make_accountant(name: str) -> Any:
    """A fresh Opacus accountant (the GDP accountant's 'experimental' warning is silenced)."""
    check_accountant(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_accountant(mechanism=name)


def epsilon(history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after the DP-SGD steps in ``history`` (``(sigma, q, steps)`` entries).

    0.0 for no steps, ``inf`` when any step had no noise.
    """
    delta = check_delta(delta)
    entries = compact(history)
    if not entries:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in entries):
        return math.inf
    acc = make_accountant(accountant)
    if accountant == "gdp" and len(entries) > 1:
        raise FedknError(
            "the gdp accountant needs a constant noise multiplier and sampling rate; use accountant rdp or prv"
        )
    acc.history = entries
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def dpsgd_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of ``steps`` DP-SGD steps with Poisson sampling rate ``sample_rate``."""
    return epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (within ``tolerance`` in epsilon) whose epsilon after ``steps``
    steps at ``sample_rate`` is at most ``target_epsilon`` (Opacus' ``get_noise_multiplier``)."""
    check_accountant(accountant)
    delta = check_delta(delta)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise FedknError(f"target epsilon must be a positive number, got {target_epsilon!r}")
    _, sample_rate, steps = _check_entry(1.0, sample_rate, steps)
    if steps < 1:
        raise FedknError("cannot calibrate noise for 0 planned DP-SGD steps")
    try:
        return _calibrate(float(target_epsilon), delta, sample_rate, steps, accountant, float(tolerance))
    except ValueError as err:
        raise FedknError(
            f"target epsilon {target_epsilon} at delta {delta} is out of reach for {steps} steps at sampling rate "
            f"{sample_rate:.4g} ({err}); raise the target epsilon or plan fewer rounds/steps"
        ) from None


@WORKER_CACHE.memo("dp-noise-calibrations", 256)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
               tolerance: float) -> float:
    """Cached: the binary search takes seconds, and every client repeats it every round."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=steps, accountant=accountant, epsilon_tolerance=tolerance,
        ))


@dataclass
class PrivacyLedger:
    """One client's DP-SGD history, one entry per round it trained in (see module docstring).

    Serializable with :meth:`to_record` / :meth:`from_record` (flat lists of numbers, the shape of
    a Flower ``ConfigRecord``) so a client can keep it in ``context.state`` across rounds.
    """

    delta: float
    accountant: str = "rdp"
    #: ``(server_round, noise_multiplier, sample_rate, steps)`` per round the client trained in.
    rounds: list[tuple[int, float, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_delta(self.delta)
        check_accountant(self.accountant)

    def record(self, server_round: int, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add one round's DP-SGD steps (replaces an earlier entry for the same round: a retry)."""
        sigma, q, steps = _check_entry(noise_multiplier, sample_rate, steps)
        self.rounds = [r for r in self.rounds if r[0] != int(server_round)]
        self.rounds.append((int(server_round), sigma, q, steps))
        self.rounds.sort(key=lambda r: r[0])

    @property
    def rounds_participated(self) -> int:
        return len(self.rounds)

    @property
    def total_steps(self) -> int:
        return sum(r[3] for r in self.rounds)

    def history(self, up_to_round: int | None = None) -> list[Entry]:
        return [(s, q, n) for r, s, q, n in self.rounds if up_to_round is None or r <= up_to_round]

    def round_epsilon(self, server_round: int | None = None) -> float:
        """Epsilon of one round's steps alone (the latest round by default; 0.0 if none)."""
        if not self.rounds:
            return 0.0
        target = self.rounds[-1][0] if server_round is None else int(server_round)
        return epsilon([(s, q, n) for r, s, q, n in self.rounds if r == target], self.delta, self.accountant)

    def epsilon(self, up_to_round: int | None = None) -> float:
        """Cumulative epsilon over the rounds ``<= up_to_round`` this client trained in."""
        return epsilon(self.history(up_to_round), self.delta, self.accountant)

    def to_record(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "accountant": self.accountant,
            "rounds": [r[0] for r in self.rounds],
            "noise-multipliers": [r[1] for r in self.rounds],
            "sample-rates": [r[2] for r in self.rounds],
            "steps": [r[3] for r in self.rounds],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PrivacyLedger:
        ledger = cls(float(record["delta"]), str(record["accountant"]))
        for r, s, q, n in zip(record["rounds"], record["noise-multipliers"], record["sample-rates"],
                              record["steps"], strict=True):
            ledger.record(int(r), float(s), float(q), int(n))
        return ledger


__all__ = [
    "ACCOUNTANTS",
    "PrivacyLedger",
    "calibrate_noise",
    "check_accountant",
    "check_delta",
    "compact",
    "dpsgd_epsilon",
    "epsilon",
    "make_accountant",
]
