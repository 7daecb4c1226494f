"""What a process keeps between calls, as one explicit object: :data:`WORKER_CACHE`.

Ray runs many virtual clients in one worker process, one message after another, and each message
would otherwise reload the dataset, rebuild the federation and the model, reparse the config and
recalibrate DP-SGD's noise. Those results are memoized here, in named tables, instead of in hidden
per-function caches, so that a benchmark or a test can see what is held (:meth:`WorkerCache.sizes`)
and forget it (:meth:`WorkerCache.clear`) without reaching into private names.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class WorkerCache:
    """Named least-recently-used tables of memoized calls, safe across threads."""

    def __init__(self) -> None:
        self._tables: dict[str, OrderedDict[Hashable, Any]] = {}
        self._lock = threading.RLock()

    def memo(self, table: str, maxsize: int) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorator: memoize a function of hashable arguments in ``table`` (at most ``maxsize``
        results; the least recently used goes first)."""
        if table in self._tables:
            raise ValueError(f"cache table '{table}' is taken")
        store: OrderedDict[Hashable, Any] = OrderedDict()
        self._tables[table] = store

        def decorate(fn: Callable[P, R]) -> Callable[P, R]:
            @functools.wraps(fn)
            def cached(*args: P.args, **kwargs: P.kwargs) -> R:
                key = (args, tuple(sorted(kwargs.items())))
                with self._lock:
                    if key in store:
                        store.move_to_end(key)
                        return store[key]
                value = fn(*args, **kwargs)  # outside the lock: loading a dataset can take seconds
                with self._lock:
                    store[key] = value
                    store.move_to_end(key)
                    while len(store) > maxsize:
                        store.popitem(last=False)
                return value

            return cached

        return decorate

    def clear(self, *tables: str) -> None:
        """Forget the named tables (every table when none is named)."""
        with self._lock:
            unknown = set(tables) - set(self._tables)
            if unknown:
                raise KeyError(f"no cache table {sorted(unknown)}; tables: {sorted(self._tables)}")
            for name in tables or tuple(self._tables):
                self._tables[name].clear()

    def sizes(self) -> dict[str, int]:
        """Entries held per table."""
        with self._lock:
            return {name: len(store) for name, store in self._tables.items()}


#: The process's one cache (a Ray worker's, a test's, the CLI's).
WORKER_CACHE = WorkerCache()
