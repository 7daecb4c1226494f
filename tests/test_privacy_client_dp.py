"""Client-level DP: Flower's DP wrappers around fedkn strategies, and the stated guarantee."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from opacus.accountants import RDPAccountant

from fedkn.config import CLIENT_DP_MODES, ClientDPConfig
from fedkn.errors import FedknError
from strategies.dp import (
    UNIFORM_WEIGHT_KEY,
    client_level_guarantee,
    client_mod,
    wrap_strategy,
)
from strategies.factory import FedknFedAdam, FedknFedAvg

FLOWER_CLASS = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
    "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
}


def _reply(node: int, content: RecordDict | None = None, error: Error | None = None) -> Message:
    """A train reply from ``node`` (metadata as the SuperLink would set it)."""
    md = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="i",
                  group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(content=content, error=error, metadata=md)


def _fedavg(**kw):
    return FedknFedAvg(fraction_train=0.5, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1,
                       seed=0, weighted_by_key=UNIFORM_WEIGHT_KEY, **kw)


@pytest.mark.parametrize("mode", [m for m in CLIENT_DP_MODES if m != "off"])
def test_wrappers_build_and_forward_fedkn_api(mode):
    inner = _fedavg()
    settings = ClientDPConfig(mode=mode, noise_multiplier=0.5, clipping_norm=2.0, count_stddev=1.0)
    dp = wrap_strategy(inner, settings, num_sampled_clients=5)
    assert isinstance(dp, FLOWER_CLASS[mode])
    assert dp.strategy is inner
    assert dp.num_sampled_clients == 5 and dp.clipping_norm == 2.0
    # fedkn's strategy API reaches the inner strategy through the wrapper.
    assert dp.records is inner.records
    # The checkpointed state adds the clipping norm (adaptive clipping moves it) to the inner state.
    assert dp.state_dict() == {"dp.clipping_norm": 2.0}
    dp.load_state_dict({"dp.clipping_norm": np.asarray([1.25])})
    assert dp.clipping_norm == 1.25
    dp.bind({101: 0, 102: 1}, round_offset=3)
    assert inner.round_offset == 3 and dp.num_partitions == 2
    assert (client_mod(mode) is not None) == mode.startswith("client")
    if settings.adaptive:  # Flower splits the total noise between the update and the clipped count
        assert dp.noise_multiplier > 0.5
    else:
        assert dp.noise_multiplier == 0.5


def test_off_returns_the_strategy_and_mods_match_modes():
    inner = _fedavg()
    assert wrap_strategy(inner, ClientDPConfig(), num_sampled_clients=5) is inner
    assert client_mod("client-fixed") is fixedclipping_mod
    assert client_mod("client-adaptive") is adaptiveclipping_mod
    assert client_mod("server-fixed") is None and client_mod("off") is None


def test_guarantee_needs_uniform_averaging():
    settings = ClientDPConfig(mode="server-fixed")
    weighted = FedknFedAvg(fraction_train=0.5, seed=0)  # weighs by num-examples
    with pytest.raises(FedknError, match=UNIFORM_WEIGHT_KEY):
        wrap_strategy(weighted, settings, num_sampled_clients=5)
    with pytest.raises(FedknError, match="fedavg or fedprox"):
        wrap_strategy(FedknFedAdam(seed=0, weighted_by_key=UNIFORM_WEIGHT_KEY), settings, num_sampled_clients=5,
                      strategy_name="fedadam")
    with pytest.raises(FedknError, match="'client-dp' must be one of off"):
        ClientDPConfig(mode="local")
    with pytest.raises(FedknError, match="count-stddev above 0.5"):  # Flower's default m/20 = 0.25
        wrap_strategy(_fedavg(), ClientDPConfig(mode="server-adaptive", noise_multiplier=1.0), num_sampled_clients=5)


def test_client_error_still_stops_the_run():
    from strategies.base import ClientFailure

    dp = wrap_strategy(_fedavg(), ClientDPConfig(mode="server-fixed"), num_sampled_clients=1)
    dp.bind({7: 0})
    reply = _reply(7, error=Error(code=2, reason="FedknError: the data is gone"))
    with pytest.raises(ClientFailure, match="data is gone"):
        dp.aggregate_train(1, [reply])


def test_server_side_clipping_and_noise_on_uniform_average():
    """End to end through the wrapper: updates are clipped to C, averaged uniformly, noised."""
    inner = _fedavg()
    dp = wrap_strategy(inner, ClientDPConfig(mode="server-fixed", noise_multiplier=0.0, clipping_norm=1.0),
                       num_sampled_clients=2)
    dp.bind({11: 0, 12: 1})
    current = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    dp.current_arrays = current
    replies = []
    for node, update in ((11, np.array([3.0, 4.0, 0, 0], dtype=np.float32)), (12, np.array([0, 0, 0.3, 0.4], dtype=np.float32))):
        content = RecordDict({"arrays": ArrayRecord({"w": Array(update)}),
                              "metrics": MetricRecord({UNIFORM_WEIGHT_KEY: 1, "num-examples": 10 * node})})
        replies.append(_reply(node, content))
    arrays, _ = dp.aggregate_train(1, replies)
    got = arrays["w"].numpy()
    # client 11's update (norm 5) is clipped to norm 1: (0.6, 0.8); client 12's (norm 0.5) is kept.
    np.testing.assert_allclose(got, [0.3, 0.4, 0.15, 0.2], rtol=1e-6)


def test_guarantee_is_monotone_and_matches_opacus():
    eps = [client_level_guarantee(s, 5, 50, 20, 1e-5).epsilon for s in (0.5, 0.8, 1.2, 2.0, 4.0)]
    assert all(a > b for a, b in itertools.pairwise(eps))  # more noise -> smaller epsilon
    more_rounds = [client_level_guarantee(1.0, 5, 50, r, 1e-5).epsilon for r in (1, 5, 20)]
    assert more_rounds == sorted(more_rounds)
    g = client_level_guarantee(1.0, 5, 50, 20, 1e-5, amplification="poisson")
    acc = RDPAccountant()
    for _ in range(20):
        acc.step(noise_multiplier=1.0, sample_rate=0.1)
    assert g.epsilon == acc.get_epsilon(delta=1e-5)
    assert g.epsilon < client_level_guarantee(1.0, 5, 50, 20, 1e-5).epsilon  # amplification helps
    assert "client-level" in g.statement and "Poisson" in g.statement
    assert g.as_dict()["sample_rate"] == 0.1
    assert math.isinf(client_level_guarantee(0.0, 5, 50, 3, 1e-5).epsilon)
    with pytest.raises(FedknError, match="sampled clients"):
        client_level_guarantee(1.0, 60, 50, 3, 1e-5)


def test_client_dp_keys_fill_the_client_dp_sub_config():
    from fedkn.config import RunConfig

    assert not RunConfig.of(strategy="fedadam").client_dp.enabled  # client-dp off by default
    keys = {"client_dp": "client-adaptive", "client_dp_noise_multiplier": 0.8, "client_dp_clipping_norm": 0.1,
            "client_dp_count_stddev": 0.0, "num_clients": 100, "fraction_train": 0.5}
    cfg = RunConfig.of(**keys)
    s = cfg.client_dp
    assert s.adaptive and s.count_stddev == 0.0 and s.noise_multiplier == 0.8 and s.clipping_norm == 0.1
    assert s.count_noise(cfg.clients_per_round) == 50 / 20  # Flower's default: clients per round / 20
    with pytest.raises(FedknError, match="fedavg or fedprox"):  # the rule runs in config validation
        RunConfig.of(**keys, norm="fedbn")
    with pytest.raises(FedknError, match="count-stddev above 1"):  # and so does Flower's adaptive condition
        RunConfig.of(**{**keys, "client_dp_noise_multiplier": 2.0, "num_clients": 20})
