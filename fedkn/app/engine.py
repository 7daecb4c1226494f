"""Which Flower engine runs this process, for error messages that name the fix that fits it.

Flower 1.41 has no public flag for it. Its simulation engine runs every ClientApp in a Ray actor
and the ServerApp beside the Ray driver, while a deployment's SuperNodes and SuperLink never start
Ray, so an initialized Ray in this process means simulation. ``tests/test_engine.py`` holds both
sides of that rule.
"""

from __future__ import annotations

import sys

from fedkn.errors import FedknError


def in_simulation() -> bool:
    """True under Flower's simulation engine (Ray is initialized in this process)."""
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def partitions_mismatch(total: int, num_clients: int) -> FedknError:
    """The error for a federation of ``total`` SuperNodes under a run config of ``num_clients``.

    In a simulation the federation is sized to the run (``num-supernodes``); in a deployment the
    SuperNodes are what they are, so the run config must follow them (``num-clients``).
    """
    if in_simulation():
        fix = f"with flwr run add --federation-config \"num-supernodes={num_clients}\""
    else:
        fix = f"pass --run-config \"num-clients={total}\" to flwr run (one partition per SuperNode)"
    return FedknError(f"the federation has {total} SuperNodes (partitions) but num-clients is {num_clients}; {fix}")
