"""The process's one explicit cache: named LRU tables that can be listed and cleared."""

from __future__ import annotations

import pytest

from fedkn.cache import WORKER_CACHE, WorkerCache


def test_memo_is_lru_per_table_and_clear_forgets_only_what_is_named():
    cache, calls = WorkerCache(), []

    @cache.memo("squares", 2)
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    @cache.memo("cubes", 4)
    def cube(x: int) -> int:
        return x ** 3

    assert [square(2), square(3), square(2), cube(2)] == [4, 9, 4, 8] and calls == [2, 3]
    square(4)  # evicts 3, the least recently used
    square(2)
    square(3)
    assert calls == [2, 3, 4, 3] and cache.sizes() == {"squares": 2, "cubes": 1}
    cache.clear("squares")
    assert cache.sizes() == {"squares": 0, "cubes": 1}
    cache.clear()
    assert cache.sizes() == {"squares": 0, "cubes": 0}
    with pytest.raises(KeyError, match="tables"):
        cache.clear("nope")
    with pytest.raises(ValueError, match="taken"):
        cache.memo("cubes", 1)


def test_the_worker_cache_holds_what_a_client_reuses():
    from fedkn.app import client_app, task  # noqa: F401 - client_app and accounting register their tables
    from fedkn.config import RunConfig
    from fedkn.privacy import accounting  # noqa: F401

    cfg = RunConfig()
    model = task.cached_model(cfg)
    assert task.cached_model(cfg) is model
    assert {"datasets", "federations", "models", "message-configs", "dp-noise-calibrations"} <= set(WORKER_CACHE.sizes())
    assert WORKER_CACHE.sizes()["models"] >= 1
    WORKER_CACHE.clear("models")
    assert task.cached_model(cfg) is not model
