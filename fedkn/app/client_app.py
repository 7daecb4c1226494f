"""The Flower ClientApp (Message API): local training and evaluation on one client's partition.

The server sends the whole resolved run config in each message's ConfigRecord (plus Flower's
``server-round``, FedProx's ``proximal-mu`` and, for FedBN, ``client-state-dir``), so the client
needs nothing but its partition: ``partition-id`` / ``num-partitions`` from the node config
(set by the simulation engine, or ``--node-config`` on a real SuperNode), else the run config.

Errors come back to the server as error replies carrying one line (never a traceback in the log);
the server stops the run with that line.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkn.app import task
from fedkn.config import RunConfig
from fedkn.errors import FedknError
from fedkn.results import load_client_state, save_client_state
from fedkn.train import default_device, evaluate, train_local
from strategies.fedbn import batchnorm_keys

#: ConfigRecord keys that are not RunConfig fields.
EXTRA_KEYS: tuple[str, ...] = ("server-round", "proximal-mu", "client-state-dir")
LOCAL_STATE_KEY = "fedbn-local-state"
LOCAL_ROUND_KEY = "fedbn-local-round"
ERROR_CODE_CLIENT = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION

app = ClientApp()


def _guard(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Turn any exception into an error reply whose reason's last line says what went wrong."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except FedknError as err:
            return Message(Error(code=ERROR_CODE_CLIENT, reason=f"FedknError: {err}"), reply_to=msg)
        except Exception as err:  # noqa: BLE001 - reported to the server, which stops the run
            detail = traceback.format_exc(limit=8)
            return Message(Error(code=ERROR_CODE_CLIENT, reason=f"{detail}\n{type(err).__name__}: {err}"), reply_to=msg)

    return wrapper


@functools.lru_cache(maxsize=8)
def _cached_config(items: frozenset[tuple[str, Any]]) -> RunConfig:
    return RunConfig.from_flower(dict(items))


def parse_message_config(msg: Message) -> tuple[RunConfig, dict[str, Any]]:
    """(RunConfig, extras) from the message's ConfigRecord."""
    if "config" not in msg.content.config_records:
        raise FedknError("message carries no 'config' record; is the server a fedkn ServerApp?")
    values = dict(msg.content.config_records["config"])
    extras = {k: values.pop(k) for k in EXTRA_KEYS if k in values}
    return _cached_config(frozenset(values.items())), extras


def partition_of(context: Context, num_clients: int | None = None) -> tuple[int, int]:
    """(partition id, number of partitions) of this node."""
    for source in (context.node_config, context.run_config):
        if "partition-id" in source:
            try:
                pid = int(source["partition-id"])
                total = int(source.get("num-partitions", num_clients or 0))
            except (TypeError, ValueError):
                raise FedknError("node config 'partition-id' and 'num-partitions' must be integers") from None
            break
    else:
        raise FedknError(
            "this SuperNode has no 'partition-id'; start it with --node-config \"partition-id=0 num-partitions=10\""
        )
    if num_clients is not None and total != num_clients:
        raise FedknError(
            f"the federation has {total} partitions (SuperNodes) but num-clients is {num_clients}; "
            f"with flwr run pass --federation-config \"num-supernodes={num_clients}\""
        )
    if not 0 <= pid < total:
        raise FedknError(f"partition-id {pid} is out of range 0..{total - 1}")
    return pid, total


def _local_state(context: Context, extras: dict[str, Any], pid: int, up_to_round: int) -> dict[str, torch.Tensor] | None:
    """This client's BatchNorm state (FedBN): Flower's context state, else its on-disk mirror."""
    if LOCAL_STATE_KEY in context.state.array_records:
        return dict(context.state.array_records[LOCAL_STATE_KEY].to_torch_state_dict())
    state_dir = extras.get("client-state-dir")
    if state_dir:  # a resumed run: the Context is new, the disk copy is not
        return load_client_state(state_dir, pid, up_to_round)
    return None


def _prepare(msg: Message, context: Context, *, for_round: int) -> tuple[RunConfig, dict[str, Any], int, Any, torch.nn.Module, list[str]]:
    cfg, extras = parse_message_config(msg)
    pid, _ = partition_of(context, cfg.num_clients)
    fed = task.federation(cfg)
    model = task.cached_model(cfg)
    if "arrays" not in msg.content.array_records:
        raise FedknError("message carries no 'arrays' record")
    state = dict(msg.content.array_records["arrays"].to_torch_state_dict())
    local_keys = batchnorm_keys(model) if cfg.local_keys_stay_local else []
    if local_keys:
        local = _local_state(context, extras, pid, for_round)
        if local is None:  # never trained yet: the model's initial BatchNorm state
            fresh = task.new_model(cfg, fed.train_set).state_dict()
            local = {k: fresh[k] for k in local_keys}
        state.update({k: local[k] for k in local_keys})
    task.load_weights(model, state)
    return cfg, extras, pid, fed, model, local_keys


@app.query()
@_guard
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (for seeded client sampling)."""
    pid, total = partition_of(context)
    metrics = MetricRecord({"partition-id": pid, "num-partitions": total})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
@_guard
def train(msg: Message, context: Context) -> Message:
    """Load the global model, train locally, return the updated arrays and train metrics."""
    cfg, extras, pid, fed, model, local_keys = _prepare(msg, context, for_round=int(extras_round(msg)) - 1)
    server_round = int(extras.get("server-round", 0))
    seed = task.client_seed(cfg, server_round, pid)
    torch.manual_seed(seed)  # KernelNorm's dropout draws from the global generator
    generator = torch.Generator().manual_seed(seed)
    mu = float(extras.get("proximal-mu", cfg.proximal_mu)) if cfg.strategy == "fedprox" else 0.0
    result = train_local(
        model,
        fed.train_set,
        fed.client(pid).train,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        epochs=cfg.local_epochs,
        steps=cfg.local_steps or None,
        proximal_mu=mu,
        generator=generator,
        device=default_device(),
        preprocess=task.preprocess(cfg, fed.train_set, train=True),
    )
    state = model.state_dict()
    if local_keys:
        local = {k: state[k].detach().cpu().clone() for k in local_keys}
        context.state[LOCAL_STATE_KEY] = ArrayRecord.from_torch_state_dict(local)
        context.state[LOCAL_ROUND_KEY] = ConfigRecord({"round": server_round})
        if extras.get("client-state-dir"):
            save_client_state(extras["client-state-dir"], pid, server_round, local)
    shared = {k: v for k, v in state.items() if k not in local_keys}
    metrics = MetricRecord(
        {
            "train-loss": float(result.loss),
            "train-accuracy": float(result.accuracy),
            "num-examples": int(result.num_examples),
        }
    )
    content = RecordDict({"arrays": ArrayRecord.from_torch_state_dict(shared), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@_guard
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the global model (with this client's BatchNorm under FedBN) on the local test split."""
    cfg, extras, pid, fed, model, _ = _prepare(msg, context, for_round=int(extras_round(msg)))
    result = evaluate(
        model,
        fed.train_set,
        fed.client(pid).test,
        batch_size=cfg.eval_batch_size,
        device=default_device(),
        preprocess=task.preprocess(cfg, fed.train_set, train=False),
    )
    metrics = MetricRecord(
        {
            "eval-loss": float(result.loss),
            "eval-accuracy": float(result.accuracy),
            "num-examples": int(result.num_examples),
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def extras_round(msg: Message) -> int:
    record = msg.content.config_records.get("config")
    return int(record.get("server-round", 0)) if record is not None else 0
