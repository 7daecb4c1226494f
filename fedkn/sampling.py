"""Deterministic client sampling: which partitions take part in a round.

Flower's strategies sample nodes with Python's global ``random`` and node ids that change from
run to run. fedkn samples *partition ids* from a generator seeded by ``(seed, round, phase)``, so
the same seed picks the same clients in every run, and a resumed run picks what the uninterrupted
run would have picked. Pure numpy: no Flower here.
"""

from __future__ import annotations

import numpy as np

#: Separate streams for the train and the evaluate sample of the same round.
PHASES: dict[str, int] = {"train": 0, "evaluate": 1}


def sample_partitions(num_partitions: int, sample_size: int, *, seed: int, server_round: int, phase: str = "train") -> list[int]:
    """``sample_size`` distinct partition ids out of ``range(num_partitions)``, sorted."""
    if not 0 <= sample_size <= num_partitions:
        raise ValueError(f"cannot sample {sample_size} of {num_partitions} partitions")
    if sample_size == num_partitions:
        return list(range(num_partitions))
    rng = np.random.default_rng([int(seed), int(server_round), PHASES[phase]])
    return sorted(int(i) for i in rng.choice(num_partitions, size=sample_size, replace=False))


def sample_size(num_partitions: int, fraction: float, minimum: int = 1) -> int:
    """Flower's rule: ``int(num_partitions * fraction)``, at least ``minimum`` (0 when fraction is 0)."""
    if fraction <= 0.0:
        return 0
    return min(num_partitions, max(int(num_partitions * fraction), minimum))
