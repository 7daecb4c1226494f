"""Split a labelled dataset among federated clients, IID or with a chosen kind of skew.

Every scheme assigns each sample to exactly one client (an ``owner`` array), so no sample is ever
lost or duplicated, and all randomness comes from ``np.random.default_rng(seed)``, so a seed fixes
the split. :func:`partition` is the one entry point; :func:`parse_partition` reads the one-token
form used by configs and the CLI.

Schemes and their parameters (defaults in :data:`DEFAULT_PARAMS`):

``iid``
    A random permutation cut into near-equal parts.
``dirichlet`` (``alpha``, ``min_samples``)
    Label skew (Hsu et al., 2019): each class is spread over clients with proportions drawn from
    Dirichlet(``alpha``); small ``alpha`` gives clients dominated by one or two classes.
``shards`` (``classes_per_client`` = k)
    Pathological label skew after McMahan et al. (2017), but where their random shards may give a
    client fewer or more classes, here each client gets exactly k distinct classes (see
    :func:`_assign_classes`) and each class is cut into equal shards among its holders.
``classes-balance`` (``classes_per_client`` = k, ``balance`` in [0, 1])
    As ``shards`` but with client sizes controlled by ``balance``; see :func:`_classes_balance`.
``quantity`` (``alpha``, ``min_samples``)
    Quantity skew: client sizes from Dirichlet(``alpha``) over clients, labels IID within each.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from fedkn.errors import FedknError

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards", "classes-balance", "quantity")

#: Parameters each scheme accepts, with their defaults.
DEFAULT_PARAMS: dict[str, dict[str, float | int]] = {
    "iid": {},
    "dirichlet": {"alpha": 0.5, "min_samples": 2},
    "shards": {"classes_per_client": 2},
    "classes-balance": {"classes_per_client": 2, "balance": 1.0},
    "quantity": {"alpha": 0.5, "min_samples": 2},
}
_INT_PARAMS = frozenset({"min_samples", "classes_per_client"})

#: Dirichlet draws before falling back to moving samples into clients below ``min_samples``.
_DIRICHLET_TRIES = 10
#: Size ratio between the largest and smallest client target at ``balance=0``.
_IMBALANCE_RATIO = 100.0
#: Iterative proportional fitting rounds for ``classes-balance``: feasible targets settle in far
#: fewer; a fixed count bounds the work when the class structure makes them infeasible.
_IPF_ROUNDS = 200


def partition(labels: np.ndarray, num_clients: int, scheme: str, seed: int, **params: Any) -> list[np.ndarray]:
    """Split sample indices ``range(len(labels))`` among ``num_clients`` clients.

    Returns one sorted ``int64`` index array per client; together they cover every index exactly
    once and every client gets at least one sample (``min_samples`` where the scheme has it).
    Raises :class:`FedknError` for an unknown scheme, unknown or out-of-range parameters, or more
    clients than samples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise FedknError(f"labels must be a 1-D integer array, got {labels.dtype} with shape {labels.shape}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise FedknError(f"seed must be a non-negative integer, got {seed!r}.")
    resolved = resolve_params(scheme, params)
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise FedknError(f"the number of clients must be a positive integer, got {num_clients!r}.")
    if num_clients > len(labels):
        raise FedknError(
            f"cannot give {num_clients} clients a sample each from {len(labels)} samples; "
            f"use at most {len(labels)} clients."
        )
    min_samples = int(resolved.get("min_samples", 1))
    if min_samples * num_clients > len(labels):
        raise FedknError(
            f"{num_clients} clients x min_samples={min_samples} exceeds the {len(labels)} samples; "
            "lower min_samples or the number of clients."
        )
    rng = np.random.default_rng(int(seed))
    owner = _SCHEME_FUNCS[scheme](labels, int(num_clients), rng, **resolved)
    owner = _top_up(owner, int(num_clients), max(min_samples, 1), rng)
    return _groups(owner, int(num_clients))


def resolve_params(scheme: str, params: dict[str, Any]) -> dict[str, float | int]:
    """``params`` checked against ``scheme`` (names, types, ranges) and completed with defaults."""
    if scheme not in SCHEMES:
        raise FedknError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}.")
    accepted = DEFAULT_PARAMS[scheme]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        takes = f"its parameters are {', '.join(accepted)}" if accepted else "it takes no parameters"
        raise FedknError(f"partition scheme {scheme!r} does not take {', '.join(unknown)}; {takes}.")
    resolved = dict(accepted)
    for key, value in params.items():
        resolved[key] = _coerce(key, value)
    if "alpha" in resolved and not resolved["alpha"] > 0:
        raise FedknError(f"alpha must be > 0 (smaller = more skewed), got {resolved['alpha']}.")
    if "min_samples" in resolved and resolved["min_samples"] < 0:
        raise FedknError(f"min_samples must be >= 0, got {resolved['min_samples']}.")
    if "balance" in resolved and not 0.0 <= resolved["balance"] <= 1.0:
        raise FedknError(f"balance must be in [0, 1] (1 = equal client sizes), got {resolved['balance']}.")
    if "classes_per_client" in resolved and resolved["classes_per_client"] < 1:
        raise FedknError(f"classes_per_client must be at least 1, got {resolved['classes_per_client']}.")
    return resolved


def _coerce(key: str, value: Any) -> float | int:
    if isinstance(value, bool):
        raise FedknError(f"partition parameter {key} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FedknError(f"partition parameter {key} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise FedknError(f"partition parameter {key} must be finite, got {value!r}.")
    if key in _INT_PARAMS:
        if not number.is_integer():
            raise FedknError(f"partition parameter {key} must be a whole number, got {value!r}.")
        return int(number)
    return number


# --- one-token specs ---------------------------------------------------------------------------

_ALIASES: tuple[tuple[re.Pattern[str], str, str | None], ...] = (
    (re.compile(r"dir(?:ichlet)?(\d*\.?\d+(?:e-?\d+)?)"), "dirichlet", "alpha"),
    (re.compile(r"(\d+)cls"), "shards", "classes_per_client"),
    (re.compile(r"shards(\d+)"), "shards", "classes_per_client"),
)


def parse_partition(spec: str) -> tuple[str, dict[str, float | int]]:
    """Parse a one-token partition spec into ``(scheme, params)``.

    Form: ``SCHEME[:key=value[,key=value...]]``, where SCHEME is a name from :data:`SCHEMES` or a
    short alias, and keys may use ``-`` for ``_``. Aliases: ``dir0.3`` (= ``dirichlet:alpha=0.3``),
    ``2cls`` and ``shards2`` (= ``shards:classes_per_client=2``). Examples: ``iid``,
    ``dir0.05:min_samples=5``, ``classes-balance:classes-per-client=2,balance=0.5``,
    ``quantity:alpha=1``. Only the given parameters are returned; :func:`resolve_params` adds defaults.
    """
    head, _, tail = spec.strip().partition(":")
    head = head.strip().lower()
    params: dict[str, float | int] = {}
    scheme = head
    for pattern, alias_scheme, key in _ALIASES:
        match = pattern.fullmatch(head)
        if match:
            scheme = alias_scheme
            params[key] = _coerce(key, match.group(1))
            break
    if scheme not in SCHEMES:
        raise FedknError(
            f"unknown partition {spec!r}; use one of {', '.join(SCHEMES)} or an alias like dir0.3 or 2cls, "
            "optionally followed by :key=value,..."
        )
    for item in filter(None, (part.strip() for part in tail.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise FedknError(f"partition parameter {item!r} in {spec!r} needs the form key=value.")
        key = key.strip().replace("-", "_")
        params[key] = _coerce(key, value.strip())
    resolve_params(scheme, params)  # fail here, on the spec, rather than later
    return scheme, params


def format_partition(scheme: str, params: dict[str, Any]) -> str:
    """The canonical one-token spec, e.g. ``dirichlet:alpha=0.3,min_samples=2``."""
    if not params:
        return scheme
    return f"{scheme}:" + ",".join(f"{key}={params[key]:g}" for key in sorted(params))


# --- schemes: each returns owner[i] = client of sample i -------------------------------------

def _iid(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    sizes = np.full(n, len(labels) // n)
    sizes[: len(labels) % n] += 1
    return _deal(sizes, rng)


def _quantity(labels: np.ndarray, n: int, rng: np.random.Generator, alpha: float, min_samples: int) -> np.ndarray:
    # min_samples each up front, the rest by Dirichlet shares: no resampling needed.
    spare = len(labels) - n * min_samples
    sizes = min_samples + _round_to_total(_safe_dirichlet(rng, alpha, n) * spare, spare)
    return _deal(sizes, rng)


def _dirichlet(labels: np.ndarray, n: int, rng: np.random.Generator, alpha: float, min_samples: int) -> np.ndarray:
    owner = np.empty(len(labels), dtype=np.int64)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(_DIRICHLET_TRIES):
        for idx in members:
            # Largest-remainder rounding: cutting at floor(cumsum) would hand the last client
            # about half a sample of every class.
            counts = _round_to_total(_safe_dirichlet(rng, alpha, n) * len(idx), len(idx))
            owner[rng.permutation(idx)] = np.repeat(np.arange(n), counts)
        if np.bincount(owner, minlength=n).min() >= min_samples:
            break
    return owner  # partition() tops up clients still short after the last try


def _safe_dirichlet(rng: np.random.Generator, alpha: float, n: int) -> np.ndarray:
    shares = rng.dirichlet(np.full(n, alpha))
    if not np.all(np.isfinite(shares)) or shares.sum() <= 0:  # tiny alpha can underflow
        shares = np.eye(n)[rng.integers(n)]
    return shares


def _shards(labels: np.ndarray, n: int, rng: np.random.Generator, classes_per_client: int) -> np.ndarray:
    holders = _assign_classes(labels, rng.permutation(n), classes_per_client, rng)
    return _split_classes(labels, holders, holders.astype(np.float64), rng)


def _classes_balance(
    labels: np.ndarray, n: int, rng: np.random.Generator, classes_per_client: int, balance: float
) -> np.ndarray:
    """k classes per client; client sizes from equal (``balance=1``) to highly unequal (``balance=0``).

    Construction:

    1. Client ``i`` gets a target size proportional to ``100 ** (-(1 - balance) * u_i)``, with
       ``u`` a random permutation of ``n`` evenly spaced values in [0, 1]: equal targets at
       ``balance=1``, a geometric ladder down to a client 100x smaller than the largest at
       ``balance=0`` (10x at 0.5).
    2. Classes are dealt as in ``shards`` (:func:`_assign_classes`), with clients placed largest,
       smallest, 2nd largest, 2nd smallest... around the circle, so that every large client
       shares its classes with small ones.
    3. Iterative proportional fitting finds per-(client, class) amounts on the held classes
       whose class sums equal the class sizes exactly and whose client sums approach the targets
       as closely as the class structure allows: a client never exceeds the size of its k
       classes, and when ``n * k == C`` the class sets are disjoint so ``balance`` has no effect.
       On digits, 10 clients x 2 classes spread about 1:1 at ``balance=1``, 8:1 at 0.5 and 50:1
       at 0.
    4. Amounts are rounded per class (largest remainder, each holder at least one sample when the
       class has enough) and each class's shuffled samples are cut accordingly.
    """
    ranks = rng.permutation(np.linspace(0.0, 1.0, n)) if n > 1 else np.zeros(1)
    weights = _IMBALANCE_RATIO ** (-(1.0 - balance) * ranks)
    targets = weights / weights.sum() * len(labels)
    # Around the circle: largest, smallest, 2nd largest, 2nd smallest... Neighbours share classes,
    # so each large client sits between small ones it can take samples from.
    descending = np.argsort(ranks)
    order = np.empty(n, dtype=np.int64)
    order[0::2], order[1::2] = descending[: (n + 1) // 2], descending[(n + 1) // 2 :][::-1]
    holders = _assign_classes(labels, order, classes_per_client, rng)
    class_sizes = np.bincount(np.unique(labels, return_inverse=True)[1]).astype(np.float64)
    amounts = holders.astype(np.float64)
    for _ in range(_IPF_ROUNDS):
        amounts *= (targets / amounts.sum(axis=1))[:, None]
        amounts *= (class_sizes / amounts.sum(axis=0))[None, :]
    return _split_classes(labels, holders, amounts, rng)


def _assign_classes(labels: np.ndarray, order: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(n, C) 0/1 matrix: client i holds class c. Exactly k classes each, every class held.

    Classes sit on a circle in random order; client ``order[j]`` holds the k consecutive classes
    starting at ``floor(j * C / n)``. Consecutive starts are at most ``ceil(C / n) <= k`` apart,
    so once ``n * k >= C`` every class is held, holders per class differ by at most one or two,
    and neighbouring clients share classes in a chain, along which ``classes-balance`` can move
    samples from small clients to large ones.
    """
    n, num_classes = len(order), len(np.unique(labels))
    if k > num_classes:
        raise FedknError(
            f"classes_per_client={k} exceeds the {num_classes} classes in the data; use at most {num_classes}."
        )
    if n * k < num_classes:
        raise FedknError(
            f"{n} clients x {k} classes cannot cover all {num_classes} classes; "
            f"use at least {math.ceil(num_classes / k)} clients or more classes per client."
        )
    circle = rng.permutation(num_classes)
    starts = (np.arange(n) * num_classes) // n
    holders = np.zeros((n, num_classes), dtype=np.int64)
    holders[order[:, None], circle[(starts[:, None] + np.arange(k)) % num_classes]] = 1
    return holders


def _split_classes(
    labels: np.ndarray, holders: np.ndarray, amounts: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Cut each class's shuffled samples among its holders in proportion to ``amounts[:, c]``."""
    owner = np.empty(len(labels), dtype=np.int64)
    for c, value in enumerate(np.unique(labels)):
        idx = rng.permutation(np.flatnonzero(labels == value))
        clients = np.flatnonzero(holders[:, c])
        floor = 1 if len(idx) >= len(clients) else 0
        spare = len(idx) - floor * len(clients)
        share = np.maximum(amounts[clients, c] - floor, 0.0)
        share = share / share.sum() if share.sum() > 0 else np.full(len(clients), 1.0 / len(clients))
        counts = floor + _round_to_total(share * spare, spare)
        owner[idx] = np.repeat(clients, counts)
    return owner


# --- helpers -----------------------------------------------------------------------------------

def _deal(sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Owner array giving client i ``sizes[i]`` samples chosen uniformly at random."""
    owner = np.empty(int(sizes.sum()), dtype=np.int64)
    owner[rng.permutation(len(owner))] = np.repeat(np.arange(len(sizes)), sizes)
    return owner


def _round_to_total(values: np.ndarray, total: int) -> np.ndarray:
    """Non-negative integers summing to ``total``, closest to ``values`` (largest remainder)."""
    floors = np.floor(values).astype(np.int64)
    short = total - int(floors.sum())
    order = np.argsort(-(values - floors), kind="stable")
    floors[order[:short]] += 1
    return floors


def _top_up(owner: np.ndarray, n: int, min_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Move random samples from the largest clients into clients below ``min_samples``.

    Deterministic and bounded: each move fills part of one deficit from a client with surplus,
    and the caller checked that ``n * min_samples`` samples exist, so surplus never runs out.
    """
    counts = np.bincount(owner, minlength=n)
    for client in np.flatnonzero(counts < min_samples):
        while counts[client] < min_samples:
            donor = int(np.argmax(counts))
            take = min(min_samples - counts[client], counts[donor] - min_samples)
            moved = rng.choice(np.flatnonzero(owner == donor), size=take, replace=False)
            owner[moved] = client
            counts[donor] -= take
            counts[client] += take
    return owner


def _groups(owner: np.ndarray, n: int) -> list[np.ndarray]:
    """Per-client sorted int64 index arrays from an owner array."""
    order = np.argsort(owner, kind="stable").astype(np.int64)
    return np.split(order, np.cumsum(np.bincount(owner, minlength=n))[:-1])


_SCHEME_FUNCS: dict[str, Callable[..., np.ndarray]] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "shards": _shards,
    "classes-balance": _classes_balance,
    "quantity": _quantity,
}
