"""build_federation: per-client train/val/test splits, determinism, caching and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fedkn.cache import WORKER_CACHE
from fedkn.data.datasets import load_dataset
from fedkn.data.federation import build_federation
from fedkn.data.partition import parse_partition, partition
from fedkn.errors import FedknError


def test_clients_split_their_partition_disjointly() -> None:
    fed = build_federation("digits", 10, "dir0.3", 0, val_fraction=0.1)
    labels = fed.train_set.labels.numpy()
    scheme, params = parse_partition("dir0.3")
    parts = partition(labels, 10, scheme, 0, **params)  # what `fedkn partition` shows
    assert fed.num_clients == 10 and fed.test_set is load_dataset("digits", "test")
    for part, client in zip(parts, fed.clients):
        pieces = [client.train, client.val, client.test]
        assert np.array_equal(np.sort(np.concatenate(pieces)), part)
        assert all(np.all(np.diff(p) > 0) for p in pieces)
        assert len(client.test) == round(0.2 * len(part)) and len(client.val) == round(0.1 * len(part))


def test_local_test_split_is_stratified() -> None:
    fed = build_federation("digits", 4, "iid", 1, test_fraction=0.25)
    labels = fed.train_set.labels.numpy()
    for client in fed.clients:
        whole = np.bincount(labels[np.concatenate([client.train, client.test])], minlength=10)
        test = np.bincount(labels[client.test], minlength=10)
        assert np.all(np.abs(test - 0.25 * whole) <= 1.5)


def test_deterministic_cached_and_seed_dependent() -> None:
    a = build_federation("digits", 5, "iid", 7)
    assert build_federation("digits", 5, "iid", 7) is a  # cached: same object
    WORKER_CACHE.clear("federations")
    b = build_federation("digits", 5, "iid", 7)
    assert b is not a
    for x, y in zip(a.clients, b.clients):
        assert np.array_equal(x.test, y.test) and np.array_equal(x.train, y.train)
    c = build_federation("digits", 5, "iid", 8)
    assert not np.array_equal(a.client(0).train, c.client(0).train)


def test_tiny_clients_keep_a_training_sample() -> None:
    fed = build_federation("digits", 400, "quantity:alpha=0.1,min_samples=1", 0, test_fraction=0.5, val_fraction=0.4)
    assert min(len(c.train) for c in fed.clients) >= 1
    assert sum(len(c) for c in fed.clients) == len(fed.train_set)


def test_partition_params_override_the_spec() -> None:
    fed = build_federation("digits", 10, "shards2", 0, partition_params={"classes_per_client": 3})
    labels = fed.train_set.labels.numpy()
    assert all(len(np.unique(labels[np.concatenate([c.train, c.test])])) == 3 for c in fed.clients)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test_fraction": 1.0}, r"test_fraction must be in \[0, 1\)"),
        ({"val_fraction": -0.1}, r"val_fraction must be in \[0, 1\)"),
        ({"test_fraction": 0.6, "val_fraction": 0.5}, "leave room for training"),
        ({"partition_params": {"balance": 0.5}}, "does not take balance"),
    ],
)
def test_bad_fractions_and_params(kwargs: dict, message: str) -> None:
    with pytest.raises(FedknError, match=message):
        build_federation("digits", 10, "dir0.3", 0, **kwargs)


def test_client_out_of_range() -> None:
    fed = build_federation("digits", 3, "iid", 0)
    assert fed.client(2) is fed.clients[2]
    with pytest.raises(FedknError, match="clients 0..2"):
        fed.client(3)
    with pytest.raises(FedknError):
        fed.client(-1)
