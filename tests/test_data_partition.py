"""Partitioners: exact cover, determinism and guarantees as properties; label skew as statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedkn.data.datasets import load_dataset
from fedkn.data.partition import DEFAULT_PARAMS, SCHEMES, format_partition, parse_partition, partition
from fedkn.errors import FedknError

PROPERTY = settings(max_examples=60, deadline=None)


@st.composite
def problems(draw: st.DrawFn, scheme: str) -> tuple[np.ndarray, int, dict]:
    """Random labels, a client count and valid parameters for ``scheme``."""
    num_classes = draw(st.integers(1, 12))
    size = draw(st.integers(num_classes, 400))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Every class present at least once, the rest skewed so class sizes differ.
    extra = rng.choice(num_classes, size - num_classes, p=rng.dirichlet(np.ones(num_classes)))
    labels = np.concatenate([np.arange(num_classes), extra])
    labels = rng.permutation(labels).astype(np.int64)
    n = draw(st.integers(1, min(size, 40)))
    params: dict = {}
    if scheme in ("dirichlet", "quantity"):
        params["alpha"] = draw(st.sampled_from([0.01, 0.05, 0.3, 1.0, 100.0]))
        params["min_samples"] = draw(st.integers(0, 5))
        assume(n * params["min_samples"] <= size)
    if scheme in ("shards", "classes-balance"):
        params["classes_per_client"] = k = draw(st.integers(1, num_classes))
        assume(n * k >= num_classes)
    if scheme == "classes-balance":
        params["balance"] = draw(st.floats(0.0, 1.0))
    return labels, n, params


def _check_cover(parts: list[np.ndarray], size: int) -> None:
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(size))


@pytest.mark.parametrize("scheme", SCHEMES)
@PROPERTY
@given(data=st.data())
def test_exact_cover_nonempty_and_deterministic(scheme: str, data: st.DataObject) -> None:
    labels, n, params = data.draw(problems(scheme))
    seed = data.draw(st.integers(0, 2**31))
    parts = partition(labels, n, scheme, seed, **params)
    assert len(parts) == n
    _check_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= max(params.get("min_samples", 1), 1)
    again = partition(labels, n, scheme, seed, **params)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_different_seeds_give_different_partitions(scheme: str) -> None:
    labels = np.repeat(np.arange(10), 30)
    results = {tuple(map(tuple, partition(labels, 10, scheme, seed))) for seed in range(8)}
    assert len(results) >= 7


@pytest.mark.parametrize("scheme", ["shards", "classes-balance"])
@PROPERTY
@given(data=st.data())
def test_class_schemes_give_exactly_k_classes(scheme: str, data: st.DataObject) -> None:
    labels, n, params = data.draw(problems(scheme))
    k = params["classes_per_client"]
    class_sizes = np.bincount(labels)
    # Exactly k needs every class to have a sample for each holder (at most ceil(n k / C) + 1).
    assume(class_sizes.min() >= math.ceil(n * k / len(class_sizes)) + 1)
    parts = partition(labels, n, scheme, 0, **params)
    assert [len(np.unique(labels[p])) for p in parts] == [k] * n


# --- label statistics on digits -----------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    return load_dataset("digits").labels.numpy()


def _mixes(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    counts = np.stack([np.bincount(labels[p], minlength=10) for p in parts])
    return counts / counts.sum(axis=1, keepdims=True)


def test_iid_is_close_to_the_global_label_mix(digits_labels: np.ndarray) -> None:
    parts = partition(digits_labels, 10, "iid", 3)
    global_mix = np.bincount(digits_labels) / len(digits_labels)
    tv = 0.5 * np.abs(_mixes(digits_labels, parts) - global_mix).sum(axis=1)
    # ~144 samples per client: sampling noise alone gives a TV of about 0.1 (dir0.3 gives ~0.5).
    assert tv.mean() < 0.15 and tv.max() < 0.2
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_small_alpha_concentrates_clients_on_few_classes(digits_labels: np.ndarray) -> None:
    for seed in range(3):
        mixes = _mixes(digits_labels, partition(digits_labels, 20, "dirichlet", seed, alpha=0.05))
        top2 = np.sort(mixes, axis=1)[:, -2:].sum(axis=1)
        assert np.mean(top2 >= 0.8) >= 0.7


def test_large_alpha_is_nearly_iid(digits_labels: np.ndarray) -> None:
    mixes = _mixes(digits_labels, partition(digits_labels, 10, "dirichlet", 0, alpha=1000.0))
    assert np.abs(mixes - 0.1).max() < 0.06


def test_dirichlet_min_samples_even_when_resampling_cannot_reach_it(digits_labels: np.ndarray) -> None:
    # 10 classes at alpha 0.01 over 200 clients leave most clients empty on every draw: the
    # deterministic top-up has to do the work.
    parts = partition(digits_labels, 200, "dirichlet", 0, alpha=0.01, min_samples=5)
    assert min(map(len, parts)) >= 5
    _check_cover(parts, len(digits_labels))


@pytest.mark.parametrize(("n", "k"), [(10, 1), (10, 2), (20, 3), (37, 5), (10, 10)])
def test_shards_gives_exactly_k_classes_of_near_equal_share(digits_labels: np.ndarray, n: int, k: int) -> None:
    parts = partition(digits_labels, n, "shards", 1, classes_per_client=k)
    assert all(len(np.unique(digits_labels[p])) == k for p in parts)


@pytest.mark.parametrize("n", [10, 20, 30])
def test_classes_balance_one_gives_equal_sizes(digits_labels: np.ndarray, n: int) -> None:
    sizes = [len(p) for p in partition(digits_labels, n, "classes-balance", 0, classes_per_client=2, balance=1.0)]
    assert max(sizes) - min(sizes) <= max(2, 0.05 * len(digits_labels) / n)


@pytest.mark.parametrize("n", [10, 20, 30])
def test_classes_balance_zero_gives_strongly_unequal_sizes(digits_labels: np.ndarray, n: int) -> None:
    for seed in range(3):
        parts = partition(digits_labels, n, "classes-balance", seed, classes_per_client=2, balance=0.0)
        sizes = np.array([len(p) for p in parts])
        assert sizes.max() >= 8 * sizes.min()
        assert all(len(np.unique(digits_labels[p])) == 2 for p in parts)


def test_quantity_skews_sizes_but_not_labels(digits_labels: np.ndarray) -> None:
    parts = partition(digits_labels, 10, "quantity", 0, alpha=0.5)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() >= 4 * sizes.min()
    big = [p for p in parts if len(p) >= 150]
    assert big and np.abs(_mixes(digits_labels, big) - 0.1).max() < 0.1


# --- bad input --------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 5)


@pytest.mark.parametrize(
    ("n", "scheme", "params", "message"),
    [
        (5, "dirichlet", {"alpha": 0}, "alpha must be > 0"),
        (5, "quantity", {"alpha": -1}, "alpha must be > 0"),
        (5, "shards", {"classes_per_client": 11}, "exceeds the 10 classes"),
        (5, "classes-balance", {"classes_per_client": 0}, "at least 1"),
        (5, "shards", {"classes_per_client": 1.5}, "whole number"),
        (3, "shards", {"classes_per_client": 2}, "cannot cover all 10 classes"),
        (51, "iid", {}, "use at most 50 clients"),
        (0, "iid", {}, "positive integer"),
        (5, "classes-balance", {"balance": 1.5}, r"balance must be in \[0, 1\]"),
        (5, "classes-balance", {"balance": -0.1}, r"balance must be in \[0, 1\]"),
        (5, "federated", {}, "choose one of iid, dirichlet, shards, classes-balance, quantity"),
        (5, "iid", {"alpha": 1}, "takes no parameters"),
        (5, "shards", {"alpha": 1}, "its parameters are classes_per_client"),
        (20, "dirichlet", {"min_samples": 3}, "lower min_samples"),
        (5, "dirichlet", {"alpha": float("nan")}, "finite"),
    ],
)
def test_bad_input_is_a_one_line_user_error(n: int, scheme: str, params: dict, message: str) -> None:
    with pytest.raises(FedknError, match=message) as err:
        partition(LABELS, n, scheme, 0, **params)
    assert "\n" not in str(err.value)


# --- specs ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iid", ("iid", {})),
        ("dir0.3", ("dirichlet", {"alpha": 0.3})),
        ("dir1e-2", ("dirichlet", {"alpha": 0.01})),
        ("dirichlet:alpha=0.3", ("dirichlet", {"alpha": 0.3})),
        ("dir0.05:min_samples=5", ("dirichlet", {"alpha": 0.05, "min_samples": 5})),
        ("2cls", ("shards", {"classes_per_client": 2})),
        ("shards3", ("shards", {"classes_per_client": 3})),
        (
            "classes-balance:classes-per-client=2, balance=0.5",
            ("classes-balance", {"classes_per_client": 2, "balance": 0.5}),
        ),
        (" quantity:alpha=1 ", ("quantity", {"alpha": 1.0})),
    ],
)
def test_parse_partition(spec: str, expected: tuple) -> None:
    assert parse_partition(spec) == expected


@pytest.mark.parametrize(
    "spec", ["dir", "dir0", "3clsx", "shards:alpha=1", "dirichlet:alpha", "dirichlet:alpha=x", "kmeans"]
)
def test_parse_partition_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(FedknError):
        parse_partition(spec)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_format_partition_round_trips(scheme: str) -> None:
    params = DEFAULT_PARAMS[scheme]
    assert parse_partition(format_partition(scheme, params)) == (scheme, params)


def test_dirichlet_rounding_favours_no_client() -> None:
    # Cutting classes at floor(cumsum) once gave the last client ~half a sample of every class.
    labels = np.repeat(np.arange(100), 50)
    parts = partition(labels, 12, "dirichlet", 0, alpha=0.05)
    classes_held = [len(np.unique(labels[p])) for p in parts]
    assert max(classes_held) < 60
