"""Strategies: FedAvg weighting, FedBN's local BatchNorm, seeded sampling, errors, server state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fedkn.config import RunConfig
from fedkn.errors import DivergedError, FedknError
from fedkn.models import build
from fedkn.nn.batchnorm import batchnorm_keys, batchnorm_stat_keys
from fedkn.protocol import ERROR_CODE_CLIENT, ERROR_CODE_DIVERGED
from fedkn.sampling import sample_partitions, sample_size
from strategies import (
    ClientFailure,
    FedBN,
    FedknFedAdam,
    FedknFedAvg,
    FedknFedAvgM,
    FedknFedProx,
    FixBN,
    build_strategy,
)

NODES = {101: 2, 205: 0, 309: 1, 412: 3}  # node id -> partition id, deliberately unordered


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the current process's task identity; fake a ServerApp's."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


def _arrays(**named):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in named.items()})


def _reply(node_id: int, arrays: ArrayRecord | None, metrics: dict, mtype: str = MessageType.TRAIN) -> Message:
    ins = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type=mtype)
    content = {"metrics": MetricRecord(metrics)}
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=RecordDict(content), reply_to=ins)


def _strategy(cls=FedknFedAvg, **kw):
    s = cls(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=len(NODES), seed=3, **kw)
    s.bind(NODES)
    return s


def test_fedavg_weights_by_examples_against_hand_computed_average():
    s = _strategy()
    s.configure_train(1, _arrays(w=np.zeros(3, np.float32), b=np.zeros(1, np.float32)), ConfigRecord(), FakeGrid(NODES))
    clients = [  # (node, w, b, examples, loss)
        (101, [1.0, 2.0, 3.0], [1.0], 10, 0.5),
        (205, [4.0, 0.0, -1.0], [2.0], 30, 1.5),
        (309, [0.0, 8.0, 2.0], [-4.0], 60, 1.0),
    ]
    replies = [
        _reply(n, _arrays(w=np.array(w, np.float32), b=np.array(b, np.float32)), {"train-loss": loss, "num-examples": k})
        for n, w, b, k, loss in clients
    ]
    arrays, metrics = s.aggregate_train(1, reversed(replies))
    expected_w = (10 * np.array([1, 2, 3]) + 30 * np.array([4, 0, -1]) + 60 * np.array([0, 8, 2])) / 100
    expected_b = (10 * 1 + 30 * 2 + 60 * -4) / 100
    np.testing.assert_allclose(arrays["w"].numpy(), expected_w, rtol=1e-6)
    np.testing.assert_allclose(arrays["b"].numpy(), [expected_b], rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx((10 * 0.5 + 30 * 1.5 + 60 * 1.0) / 100)
    rec = s.records[1]
    assert rec.clients_trained == 3 and rec.train["train-loss"] == pytest.approx(1.1)


def test_aggregation_order_does_not_depend_on_arrival_order():
    rng = np.random.default_rng(0)
    payload = [(n, rng.normal(size=50).astype(np.float32), int(rng.integers(1, 100))) for n in NODES]
    results = []
    for order in (payload, payload[::-1], payload[1:] + payload[:1]):
        s = _strategy()
        s.configure_train(1, _arrays(w=np.zeros(50, np.float32)), ConfigRecord(), FakeGrid(NODES))
        replies = [_reply(n, _arrays(w=w), {"num-examples": k, "train-loss": 1.0}) for n, w, k in order]
        results.append(s.aggregate_train(1, replies)[0]["w"].numpy())
    assert all(np.array_equal(results[0], r) for r in results[1:])  # bitwise, thanks to sorting


def test_zero_example_clients_do_not_break_averaging():
    s = _strategy()
    s.configure_train(1, _arrays(w=np.zeros(1, np.float32)), ConfigRecord(), FakeGrid(NODES))
    replies = [_reply(101, _arrays(w=np.ones(1, np.float32)), {"num-examples": 0, "train-loss": 0.0}),
               _reply(205, _arrays(w=np.full(1, 3.0, np.float32)), {"num-examples": 5, "train-loss": 2.0})]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays["w"].numpy()[0] == 3.0 and metrics["train-loss"] == 2.0
    ev = s.aggregate_evaluate(1, [_reply(101, None, {"num-examples": 0, "eval-loss": 0.0}, MessageType.EVALUATE)])
    assert ev is None


def test_client_error_stops_the_run_with_its_line():
    s = _strategy()
    ins = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=309, message_type=MessageType.TRAIN)
    bad = Message(Error(code=2, reason="Traceback...\nFedknError: batch size 1 does not work with BatchNorm"), reply_to=ins)
    with pytest.raises(ClientFailure) as info:
        s.aggregate_train(4, [bad])
    assert str(info.value) == "client 1 failed in round 4 (train): batch size 1 does not work with BatchNorm"
    with pytest.raises(FedknError, match="no client replied in round 2"):
        s.aggregate_train(2, [])


def test_a_diverged_client_reply_raises_a_typed_divergence():
    s = _strategy()
    ins = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=309, message_type=MessageType.TRAIN)
    reason = "FedknError: training diverged (loss nan) at local step 3; lower lr"
    bad = Message(Error(code=ERROR_CODE_DIVERGED, reason=reason), reply_to=ins)
    with pytest.raises(DivergedError) as info:
        s.aggregate_train(4, [bad])
    assert isinstance(info.value, ClientFailure)
    assert info.value.reason == "client 1 failed in round 4 (train): training diverged (loss nan) at local step 3; lower lr"
    other = Message(Error(code=ERROR_CODE_CLIENT, reason="FedknError: data is gone"), reply_to=ins)
    with pytest.raises(ClientFailure) as info:
        s.aggregate_train(4, [other])
    assert not isinstance(info.value, DivergedError)


def test_seeded_sampling_is_reproducible_and_round_dependent():
    a = sample_partitions(100, 10, seed=1, server_round=5)
    assert a == sample_partitions(100, 10, seed=1, server_round=5) == sorted(a) and len(set(a)) == 10
    assert a != sample_partitions(100, 10, seed=1, server_round=6)
    assert a != sample_partitions(100, 10, seed=2, server_round=5)
    assert sample_partitions(4, 4, seed=0, server_round=1) == [0, 1, 2, 3]
    assert sample_size(10, 0.3) == 3 and sample_size(10, 0.01) == 1 and sample_size(10, 0.0) == 0


def test_configure_train_sends_to_the_seeded_partitions_with_round_offset():
    s = FedknFedAvg(fraction_train=0.5, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=4, seed=3)
    s.bind(NODES, round_offset=10)
    node_of = {p: n for n, p in NODES.items()}
    msgs = list(s.configure_train(2, _arrays(w=np.zeros(2, np.float32)), ConfigRecord(), FakeGrid(NODES)))
    expected = sample_partitions(4, 2, seed=3, server_round=12)
    assert [m.metadata.dst_node_id for m in msgs] == [node_of[p] for p in expected]
    assert all(m.content["config"]["server-round"] == 12 for m in msgs)
    assert s.records[12].bytes_sent == 2 * _arrays(w=np.zeros(2, np.float32)).count_bytes()


def test_fedprox_sends_mu():
    s = _strategy(FedknFedProx, proximal_mu=0.3)
    msgs = list(s.configure_train(1, _arrays(w=np.zeros(1, np.float32)), ConfigRecord(), FakeGrid(NODES)))
    assert msgs and all(m.content["config"]["proximal-mu"] == 0.3 for m in msgs)


def _bn_model():
    torch.manual_seed(0)
    return build("resnet8", "bn", num_classes=10, in_channels=1, width=0.125)


def test_batchnorm_keys_cover_parameters_and_running_statistics():
    keys = batchnorm_keys(_bn_model())
    suffixes = {k.rsplit(".", 1)[1] for k in keys}
    assert suffixes == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    torch.manual_seed(0)
    assert batchnorm_keys(build("resnet8", "kn", num_classes=10, in_channels=1, width=0.125)) == []


def test_fedbn_keeps_batchnorm_state_local():
    model = _bn_model()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    bn = set(batchnorm_keys(model))
    s = FedBN(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=4, seed=0, local_keys=bn)
    s.bind(NODES)
    global_arrays = _arrays(**state)
    msgs = list(s.configure_train(1, global_arrays, ConfigRecord(), FakeGrid(NODES)))
    sent = set(msgs[0].content["arrays"].keys())
    assert sent == set(state) - bn, "BatchNorm entries must not be sent to clients"
    evals = list(s.configure_evaluate(1, global_arrays, ConfigRecord(), FakeGrid(NODES)))
    assert set(evals[0].content["arrays"].keys()) == set(state) - bn

    # Clients send back only non-BN arrays; the server averages those and keeps its BN entries.
    replies = []
    for i, node in enumerate(NODES):
        trained = {k: (v + (i + 1)).astype(v.dtype) for k, v in state.items() if k not in bn}
        replies.append(_reply(node, _arrays(**trained), {"num-examples": 10, "train-loss": 1.0}))
    arrays, _ = s.aggregate_train(1, replies)
    assert list(arrays.keys()) == list(state.keys())  # full model, same order
    for k, v in state.items():
        got = arrays[k].numpy()
        if k in bn:
            np.testing.assert_array_equal(got, v)  # untouched by the clients' training
        else:
            np.testing.assert_allclose(got, v + 2.5, rtol=1e-5, atol=1e-5)  # mean of +1..+4
    with pytest.raises(ValueError):
        FedBN(local_keys=[])


def _shifted(state: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {k: v + by if v.is_floating_point() else v + 1 for k, v in state.items()}


def test_fixbn_averages_statistics_until_fixbn_round_then_keeps_the_global_ones():
    model = _bn_model()
    stat_keys = batchnorm_stat_keys(model)
    assert stat_keys and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for k in stat_keys)
    s = _build(RunConfig.of(norm="fixbn", num_rounds=4), stat_keys=stat_keys)
    assert isinstance(s, FixBN) and s.freeze_after == 2
    s.bind(NODES)
    state = model.state_dict()
    mean_key = next(k for k in stat_keys if k.endswith("running_mean"))
    weight_key = mean_key.replace("running_mean", "weight")
    for r, frozen in ((2, False), (3, True)):
        s.configure_train(r, ArrayRecord.from_torch_state_dict(state), ConfigRecord(), FakeGrid(NODES))
        replies = [_reply(n, ArrayRecord.from_torch_state_dict(_shifted(state, shift)), {"num-examples": k, "train-loss": 1.0})
                   for n, shift, k in ((101, 1.0, 10), (205, 4.0, 30))]
        arrays, _ = s.aggregate_train(r, replies)
        new = dict(arrays.to_torch_state_dict())
        # Trainable arrays are always FedAvg: (10 * 1 + 30 * 4) / 40 = 3.25 above the global ones.
        torch.testing.assert_close(new[weight_key], state[weight_key] + 3.25)
        if frozen:  # statistics exactly as the global model sent them
            for k in stat_keys:
                assert torch.equal(new[k], state[k]), k
        else:
            torch.testing.assert_close(new[mean_key], state[mean_key] + 3.25)
        state = new


def _build(cfg: RunConfig, **keys):
    """``build_strategy`` as the server app calls it, from a whole RunConfig."""
    return build_strategy(cfg.federation, seed=cfg.run.seed, client_lr=cfg.train.lr,
                          uniform_weights=cfg.client_dp.enabled, **keys)


def test_build_strategy_for_every_name():
    assert isinstance(_build(RunConfig()), FedknFedAvg)
    assert _build(RunConfig.of(strategy="fedprox", proximal_mu=0.5)).proximal_mu == 0.5
    m = _build(RunConfig.of(strategy="fedavgm", server_momentum=0.7))
    assert isinstance(m, FedknFedAvgM) and m.server_momentum == 0.7
    a = _build(RunConfig.of(strategy="fedadam", fedadam_eta=0.02))
    assert isinstance(a, FedknFedAdam) and a.eta == 0.02
    fb = _build(RunConfig.of(norm="fedbn"), local_keys=batchnorm_keys(_bn_model()))
    assert isinstance(fb, FedBN)
    with pytest.raises(FedknError, match="needs a model with BatchNorm"):
        _build(RunConfig.of(norm="fedbn"))
    s = _build(RunConfig.of(num_clients=7, fraction_train=0.5, fraction_evaluate=0.2))
    assert (s.fraction_train, s.fraction_evaluate, s.min_available_nodes, s.min_clients) == (0.5, 0.2, 1, 1)
    s = _build(RunConfig.of(num_clients=7, min_clients=3))
    assert (s.min_available_nodes, s.min_clients) == (3, 3)


@pytest.mark.parametrize("cls, kw", [(FedknFedAvgM, {"server_momentum": 0.9}), (FedknFedAdam, {"eta": 0.1})])
def test_server_optimizer_state_round_trips(cls, kw):
    def run_round(s, rnd, start, true_round=None):
        s.configure_train(rnd, start, ConfigRecord(), FakeGrid(NODES))
        shift = true_round or rnd
        replies = [_reply(n, _arrays(w=start["w"].numpy() + p + shift), {"num-examples": p + 1, "train-loss": 1.0})
                   for n, p in NODES.items()]
        return s.aggregate_train(rnd, replies)[0]

    start = _arrays(w=np.zeros(3, np.float32))
    a = _strategy(cls, **kw)
    after1 = run_round(a, 1, start)
    saved = a.state_dict()
    assert saved, "the server optimizer must have state after one round"
    after2 = run_round(a, 2, after1)

    b = _strategy(cls, **kw)  # a resumed server: fresh strategy + checkpointed state
    b.load_state_dict(saved)
    b.bind(NODES, round_offset=1)
    resumed = run_round(b, 1, after1, true_round=2)  # Flower's loop restarts at 1; the offset makes it round 2
    np.testing.assert_array_equal(after2["w"].numpy(), resumed["w"].numpy())
    with pytest.raises(FedknError):
        _strategy().load_state_dict(saved)


def test_lost_supernodes_are_dropped_while_min_clients_reply():
    """Deployment: an offline, silent or unavailable SuperNode is skipped; below min-clients the run stops."""
    s = FedknFedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=2, min_clients=2, seed=3)  # as build_strategy
    s.bind(NODES)
    w = _arrays(w=np.zeros(1, np.float32))
    sent = list(s.configure_train(1, w, ConfigRecord(), FakeGrid([101, 205, 309])))  # node 412 (partition 3) is offline
    assert sorted(NODES[m.metadata.dst_node_id] for m in sent) == [0, 1, 2]
    for m in sent:  # what the Grid does when it pushes them
        m.metadata.__dict__["_message_id"] = m.object_id
    by_node = {m.metadata.dst_node_id: m for m in sent}
    ok = [_reply(n, _arrays(w=np.ones(1, np.float32)), {"train-loss": 1.0, "num-examples": 5}) for n in (101, 205)]
    gone = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=by_node[309])
    arrays, _ = s.aggregate_train(1, [gone, *ok])
    assert s.records[1].clients_trained == 2
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0])

    s.configure_train(2, w, ConfigRecord(), FakeGrid(NODES))
    with pytest.raises(FedknError, match="1 of 4 sampled clients replied, fewer than min-clients=2"):
        s.aggregate_train(2, ok[:1])  # the other three never answered within round-timeout
    with pytest.raises(FedknError, match="only 1 of 4 SuperNodes are online"):
        s.configure_train(3, w, ConfigRecord(), FakeGrid([101]))


def test_metric_average_is_flowers_own_bit_for_bit():
    """aggregate_metrics restates Flower's FedAvg metric average (not public API): same floats."""
    from flwr.app import RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    from strategies.base import aggregate_metrics

    rng = np.random.default_rng(0)
    records = [RecordDict({"metrics": MetricRecord({"num-examples": int(rng.integers(1, 50)),
                                                     "train-loss": float(rng.random()),
                                                     "per-class": [float(v) for v in rng.random(3)]})})
               for _ in range(7)]
    ours, flowers = aggregate_metrics(records, "num-examples"), aggregate_metricrecords(records, "num-examples")
    assert dict(ours) == dict(flowers) and "num-examples" not in ours
