"""The Flower ClientApp (Message API): local training and evaluation on one client's partition.

The server sends the whole resolved run config in each message's ConfigRecord (plus Flower's
``server-round``, FedProx's ``proximal-mu``, for FedBN ``client-state-dir`` and, under client-side
clipping, Flower's ``clipping_norm``), so the client needs nothing but its partition:
``partition-id`` / ``num-partitions`` from the node config (set by the simulation engine, or
``--node-config`` on a real SuperNode), else the run config.

Differential privacy: with ``dp-sgd`` the local training is DP-SGD (:mod:`fedkn.privacy.dpsgd`)
and the reply carries this round's and the cumulative epsilon; with a client-side ``client-dp``
mode Flower's clipping mod wraps the train handler.

Errors come back to the server as error replies carrying one line (never a traceback in the log);
the server stops the run with that line.
"""

from __future__ import annotations

import dataclasses
import functools
import traceback
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkn.app import task
from fedkn.app.engine import partitions_mismatch
from fedkn.cache import WORKER_CACHE
from fedkn.config import RunConfig
from fedkn.data import Federation, build_federation
from fedkn.errors import DivergedError, FedknError
from fedkn.local_state import local_keys, split_local, with_local
from fedkn.protocol import (
    ARRAYS_RECORD,
    CLIENT_STATE_DIR,
    CONFIG_RECORD,
    ERROR_CODE_CLIENT,
    ERROR_CODE_DIVERGED,
    EVAL_ACCURACY,
    EVAL_LOSS,
    EXTRA_KEYS,
    LOCAL_ROUND,
    LOCAL_STATE,
    METRICS_RECORD,
    NUM_PARTITIONS,
    PARTITION_ID,
    PROXIMAL_MU,
    SERVER_ROUND,
    TRAIN_ACCURACY,
    TRAIN_LOSS,
    UNIFORM_WEIGHT_KEY,
    WEIGHT_KEY,
)
from fedkn.results import load_client_state, save_client_state
from fedkn.sampling import sample_partitions
from fedkn.train import default_device, evaluate, train_local
from strategies.fixbn import stats_frozen

app = ClientApp()


def _guard(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Turn any exception into an error reply whose reason's last line says what went wrong."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except FedknError as err:
            code = ERROR_CODE_DIVERGED if isinstance(err, DivergedError) else ERROR_CODE_CLIENT
            return Message(Error(code=code, reason=f"FedknError: {err}"), reply_to=msg)
        except Exception as err:  # noqa: BLE001 - reported to the server, which stops the run
            detail = traceback.format_exc(limit=8)
            return Message(Error(code=ERROR_CODE_CLIENT, reason=f"{detail}\n{type(err).__name__}: {err}"), reply_to=msg)

    return wrapper


@WORKER_CACHE.memo("message-configs", 8)
def _cached_config(items: frozenset[tuple[str, Any]]) -> RunConfig:
    return RunConfig.from_flower(dict(items))


def parse_message_config(msg: Message) -> tuple[RunConfig, dict[str, Any]]:
    """(RunConfig, extras) from the message's ConfigRecord."""
    if CONFIG_RECORD not in msg.content.config_records:
        raise FedknError(f"message carries no '{CONFIG_RECORD}' record; is the server a fedkn ServerApp?")
    values = dict(msg.content.config_records[CONFIG_RECORD])
    extras = {k: values.pop(k) for k in EXTRA_KEYS if k in values}
    return _cached_config(frozenset(values.items())), extras


def partition_of(context: Context, num_clients: int | None = None) -> tuple[int, int]:
    """(partition id, number of partitions) of this node."""
    for source in (context.node_config, context.run_config):
        if PARTITION_ID in source:
            try:
                pid = int(source[PARTITION_ID])
                total = int(source.get(NUM_PARTITIONS, num_clients or 0))
            except (TypeError, ValueError):
                raise FedknError("node config 'partition-id' and 'num-partitions' must be integers") from None
            break
    else:
        raise FedknError(
            "this SuperNode has no 'partition-id'; start it with --node-config \"partition-id=0 num-partitions=10\""
        )
    if num_clients is not None and total != num_clients:
        raise partitions_mismatch(total, num_clients)
    if not 0 <= pid < total:
        raise FedknError(f"partition-id {pid} is out of range 0..{total - 1}")
    return pid, total


def node_data_config(cfg: RunConfig, node_config: Any) -> RunConfig:
    """The run config as this SuperNode sees it: its own ``data-dir``; its ``dataset`` must be the run's."""
    dataset = node_config.get("dataset")
    if dataset is not None and str(dataset) != cfg.data.dataset:
        raise FedknError(f"this SuperNode holds dataset '{dataset}' (node config) but the run trains on '{cfg.data.dataset}'")
    data_dir = node_config.get("data-dir")
    return cfg.replace(data_dir=str(data_dir)) if data_dir is not None and str(data_dir) != cfg.data.data_dir else cfg


def node_federation(cfg: RunConfig, node_config: Any) -> Federation:
    """The data this client trains on: partition ``partition-id`` of the run's partitioned dataset, or,
    with node config ``local-data=true``, all of this SuperNode's own dataset (split train/test)."""
    if str(node_config.get("local-data", "false")).lower() in ("true", "1", "yes"):
        own = build_federation(cfg.data.dataset, 1, "iid", cfg.run.seed, data_dir=cfg.data.data_dir or None,
                               test_fraction=cfg.data.test_fraction, val_fraction=cfg.data.val_fraction)
        # Whatever its partition id, this client's data is the whole local dataset.
        return dataclasses.replace(own, clients=(own.client(0),) * cfg.data.num_clients)
    return task.federation(cfg)


def _local_state(context: Context, extras: dict[str, Any], pid: int, up_to_round: int) -> dict[str, torch.Tensor] | None:
    """This client's BatchNorm state (FedBN): Flower's context state, else its on-disk mirror."""
    if LOCAL_STATE in context.state.array_records:
        return dict(context.state.array_records[LOCAL_STATE].to_torch_state_dict())
    state_dir = extras.get(CLIENT_STATE_DIR)
    if state_dir:  # a resumed run: the Context is new, the disk copy is not
        return load_client_state(state_dir, pid, up_to_round)
    return None


def _prepare(msg: Message, context: Context, *, for_round: int) -> tuple[RunConfig, dict[str, Any], int, Any, torch.nn.Module, list[str]]:
    cfg, extras = parse_message_config(msg)
    cfg = node_data_config(cfg, context.node_config)
    pid, _ = partition_of(context, cfg.data.num_clients)
    fed = node_federation(cfg, context.node_config)
    model = task.cached_model(cfg)
    if ARRAYS_RECORD not in msg.content.array_records:
        raise FedknError(f"message carries no '{ARRAYS_RECORD}' record")
    state = dict(msg.content.array_records[ARRAYS_RECORD].to_torch_state_dict())
    keys = local_keys(cfg.federation, model)
    if keys:
        local = _local_state(context, extras, pid, for_round)
        # never trained yet: the model's initial state of those keys
        state = with_local(state, local if local is not None else task.new_model(cfg, fed.train_set).state_dict(), keys)
    task.load_weights(model, state)
    return cfg, extras, pid, fed, model, keys


@app.query()
@_guard
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (for seeded client sampling)."""
    pid, total = partition_of(context)
    metrics = MetricRecord({PARTITION_ID: pid, NUM_PARTITIONS: total})
    return Message(content=RecordDict({METRICS_RECORD: metrics}), reply_to=msg)


@app.train()
@_guard
def train(msg: Message, context: Context) -> Message:
    """Local training; under client-side client-level DP, Flower's clipping mod wraps it."""
    cfg, _ = parse_message_config(msg)
    if cfg.client_dp.enabled:
        from strategies.dp import client_mod

        mod = client_mod(cfg.client_dp.mode)
        if mod is not None:
            return mod(msg, context, _train)
    return _train(msg, context)


@_guard
def _train(msg: Message, context: Context) -> Message:
    """Load the global model, train locally, return the updated arrays and train metrics."""
    cfg, extras, pid, fed, model, kept = _prepare(msg, context, for_round=int(extras_round(msg)) - 1)
    server_round = int(extras.get(SERVER_ROUND, 0))
    seed = task.client_seed(cfg, server_round, pid)
    torch.manual_seed(seed)  # KernelNorm's dropout (and DP-SGD's noise) draw from the global generator
    generator = torch.Generator().manual_seed(seed)
    mu = float(extras.get(PROXIMAL_MU, cfg.federation.proximal_mu)) if cfg.federation.strategy == "fedprox" else 0.0
    idx = fed.client(pid).train
    private = _make_private(cfg, model, len(idx))
    pieces: dict[str, Any] = {"steps": cfg.train.local_steps or None}
    if private is not None:
        pieces = {"steps": private.steps_per_round, "make_optimizer_fn": private.make_optimizer,
                  "make_batches_fn": private.make_batches, "train_step_fn": private.train_step}
    try:
        result = train_local(
            model,
            fed.train_set,
            idx,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            momentum=cfg.train.momentum,
            weight_decay=cfg.train.weight_decay,
            epochs=cfg.train.local_epochs,
            proximal_mu=mu,
            generator=generator,
            device=default_device(),
            preprocess=task.preprocess(cfg, fed.train_set, train=True),
            agc_clip=cfg.agc_ratio,
            freeze_batchnorm_stats=stats_frozen(cfg.federation, server_round),
            **pieces,
        )
    finally:
        if private is not None:
            private.close()
    shared, local = split_local(model.state_dict(), kept)
    if kept:
        context.state[LOCAL_STATE] = ArrayRecord.from_torch_state_dict(local)
        context.state[LOCAL_ROUND] = ConfigRecord({"round": server_round})
        if extras.get(CLIENT_STATE_DIR):
            save_client_state(extras[CLIENT_STATE_DIR], pid, server_round, local, keep_from=cfg.federation.first_kept_round)
    metrics = MetricRecord(
        {
            TRAIN_LOSS: float(result.loss),
            TRAIN_ACCURACY: float(result.accuracy),
            WEIGHT_KEY: int(result.num_examples),
        }
    )
    if private is not None:
        metrics.update(private.metrics(_privacy_ledger(cfg, pid, server_round, private)))
    if cfg.client_dp.enabled:
        metrics[UNIFORM_WEIGHT_KEY] = 1
    content = RecordDict({ARRAYS_RECORD: ArrayRecord.from_torch_state_dict(shared), METRICS_RECORD: metrics})
    return Message(content=content, reply_to=msg)


def _make_private(cfg: RunConfig, model: torch.nn.Module, num_samples: int) -> Any:
    """This round's DP-SGD plan (:class:`fedkn.privacy.PrivateTraining`), or None without dp-sgd."""
    if not cfg.privacy.enabled or num_samples == 0:
        return None
    from fedkn.privacy.dpsgd import make_private, settings_from_config

    train = cfg.train
    return make_private(model, num_samples=num_samples, batch_size=train.batch_size, settings=settings_from_config(cfg.privacy),
                        local_epochs=train.local_epochs, local_steps=train.local_steps, rounds=cfg.federation.num_rounds)


def _privacy_ledger(cfg: RunConfig, pid: int, server_round: int, private: Any) -> Any:
    """This client's DP-SGD history up to ``server_round``, rebuilt rather than stored.

    Sampling is deterministic (:mod:`fedkn.sampling`) and a client's plan (noise, sampling
    rate, steps) is the same in every round, so every earlier round this client was sampled in
    cost exactly this round's plan. Rebuilding it needs no client state and stays right after
    ``--resume`` (whose clients start with a fresh Context).
    """
    ledger = private.new_ledger()
    m = cfg.clients_per_round
    for r in range(1, server_round):
        if pid in sample_partitions(cfg.data.num_clients, m, seed=cfg.run.seed, server_round=r, phase="train"):
            ledger.record(r, private.noise_multiplier, private.sample_rate, private.steps_per_round)
    private.record(ledger, server_round)
    return ledger


@app.evaluate()
@_guard
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the global model (with this client's BatchNorm under FedBN) on the local test split."""
    cfg, _extras, pid, fed, model, _ = _prepare(msg, context, for_round=int(extras_round(msg)))
    result = evaluate(
        model,
        fed.train_set,
        fed.client(pid).test,
        batch_size=cfg.train.eval_batch_size,
        device=default_device(),
        preprocess=task.preprocess(cfg, fed.train_set, train=False),
    )
    metrics = MetricRecord(
        {
            EVAL_LOSS: float(result.loss),
            EVAL_ACCURACY: float(result.accuracy),
            WEIGHT_KEY: int(result.num_examples),
        }
    )
    if cfg.client_dp.enabled:  # Flower's FedAvg wants the weight key in evaluate replies too
        metrics[UNIFORM_WEIGHT_KEY] = 1
    return Message(content=RecordDict({METRICS_RECORD: metrics}), reply_to=msg)


def extras_round(msg: Message) -> int:
    record = msg.content.config_records.get(CONFIG_RECORD)
    return int(record.get(SERVER_ROUND, 0)) if record is not None else 0
