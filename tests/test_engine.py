"""The num-clients mismatch error names the fix for the engine in use (simulation or deployment)."""

from __future__ import annotations

import pytest

from fedkn.app.engine import in_simulation, partitions_mismatch


def test_outside_ray_the_fix_is_the_run_config():
    assert not in_simulation()
    msg = str(partitions_mismatch(2, 10))
    assert "2 SuperNodes (partitions) but num-clients is 10" in msg
    assert '--run-config "num-clients=2"' in msg and "num-supernodes" not in msg


@pytest.mark.slow
def test_under_ray_the_fix_is_the_federation_config():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        in_actor = ray.get(ray.remote(in_simulation).remote(), timeout=120)
        msg = str(partitions_mismatch(2, 10))
    finally:
        ray.shutdown()
    assert in_actor  # a ClientApp runs in a Ray worker
    assert '--federation-config "num-supernodes=10"' in msg and "--run-config" not in msg
    assert not in_simulation()
