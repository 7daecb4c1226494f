"""A federation: the train set partitioned among clients, each client's share split train/val/test.

Clients hold index arrays into the shared train :class:`ImageDataset`; the server evaluates on the
dataset's global test split. :func:`build_federation` is cached per process because every Flower
client (and Ray worker) rebuilds it each round from the same run config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedkn.cache import WORKER_CACHE
from fedkn.data.datasets import ImageDataset, load_dataset
from fedkn.data.partition import parse_partition, resolve_params
from fedkn.data.partition import partition as split_among_clients
from fedkn.errors import FedknError


@dataclass(frozen=True, eq=False)
class ClientSplit:
    """One client's indices into the federation's *train* dataset, sorted and disjoint.

    ``train`` is for local training, ``val`` for local hyper-parameter tuning (may be empty),
    ``test`` for federated evaluation (may be empty when the client is tiny).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def __len__(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)


@dataclass(frozen=True, eq=False)
class Federation:
    """The data of one federated run: what each client holds and what the server tests on."""

    train_set: ImageDataset
    test_set: ImageDataset
    clients: tuple[ClientSplit, ...]

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def client(self, partition_id: int) -> ClientSplit:
        if not 0 <= partition_id < len(self.clients):
            raise FedknError(
                f"partition id {partition_id} is out of range; this federation has clients 0..{len(self.clients) - 1}."
            )
        return self.clients[partition_id]


def build_federation(
    dataset: str,
    num_clients: int,
    partition: str,
    seed: int,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    partition_params: dict[str, Any] | None = None,
) -> Federation:
    """Load ``dataset``, partition its train split among ``num_clients`` and split each client.

    ``partition`` is a spec for :func:`~fedkn.data.partition.parse_partition` (``"iid"``,
    ``"dir0.3"``, ``"classes-balance:balance=0.5"``...); ``partition_params`` add to or override
    its parameters. The client partition equals ``partition(train_labels, num_clients, scheme,
    seed, **params)``, which is what ``fedkn partition`` shows. Each client's share is then split
    into ``test_fraction`` local test, ``val_fraction`` validation and the rest local train, with
    a generator seeded by ``(seed, client id)``, stratified by label, keeping at least one train
    sample. Results are cached per process: treat them as read-only.
    """
    scheme, params = parse_partition(partition)
    params.update(partition_params or {})
    params = resolve_params(scheme, params)
    for label, fraction in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise FedknError(f"{label} must be in [0, 1), got {fraction}.")
    if test_fraction + val_fraction >= 1.0:
        raise FedknError(
            f"test_fraction + val_fraction must leave room for training, got {test_fraction} + {val_fraction}."
        )
    return _build_cached(
        dataset,
        num_clients,
        scheme,
        tuple(sorted(params.items())),
        seed,
        None if data_dir is None else str(Path(data_dir).expanduser().resolve()),
        float(test_fraction),
        float(val_fraction),
    )


@WORKER_CACHE.memo("federations", 4)
def _build_cached(
    dataset: str,
    num_clients: int,
    scheme: str,
    params: tuple[tuple[str, float | int], ...],
    seed: int,
    data_dir: str | None,
    test_fraction: float,
    val_fraction: float,
) -> Federation:
    train_set = load_dataset(dataset, "train", data_dir)
    test_set = load_dataset(dataset, "test", data_dir)
    labels = train_set.labels.numpy()
    parts = split_among_clients(labels, num_clients, scheme, seed, **dict(params))
    clients = tuple(
        _split_client(part, labels[part], np.random.default_rng([seed, cid]), test_fraction, val_fraction)
        for cid, part in enumerate(parts)
    )
    return Federation(train_set=train_set, test_set=test_set, clients=clients)


def _split_client(
    indices: np.ndarray, labels: np.ndarray, rng: np.random.Generator, test_fraction: float, val_fraction: float
) -> ClientSplit:
    """Stratified split: order samples so every prefix has each label in about its share.

    Each sample's key is its random rank within its label, spread over [0, 1) (``(rank + u) /
    count``); sorting by key interleaves labels in proportion, so the first ``n_test`` keys are a
    stratified sample, the next ``n_val`` another, the rest is train.
    """
    n = len(indices)
    n_test = min(round(test_fraction * n), n - 1)
    n_val = min(round(val_fraction * n), n - 1 - n_test)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = rng.permutation(n)
    rank = np.empty(n, dtype=np.int64)
    # Rank of each sample within its label, taken in a random order.
    by_label = order[np.argsort(inverse[order], kind="stable")]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank[by_label] = np.arange(n) - np.repeat(starts, counts)
    key = (rank + rng.random(n)) / counts[inverse]
    shuffled = indices[np.argsort(key, kind="stable")]
    return ClientSplit(
        train=np.sort(shuffled[n_test + n_val :]),
        val=np.sort(shuffled[n_test : n_test + n_val]),
        test=np.sort(shuffled[:n_test]),
    )
