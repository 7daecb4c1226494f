"""What fedkn adds to every Flower strategy, as a mixin placed before the Flower class.

- **Deterministic sampling**: Flower picks nodes with the unseeded global ``random``; fedkn keeps
  Flower's sample *size* but picks partition ids with :func:`~fedkn.sampling.sample_partitions`
  (seeded by run seed and round) and maps them to node ids (learned from the nodes themselves).
- **Deterministic aggregation**: replies arrive in whatever order the clients finish; they are
  sorted by partition id before Flower averages them, so float sums do not depend on timing.
- **Round offset**: a resumed run restarts Flower's loop at 1; ``round_offset`` makes every round
  number the strategy sees (and sends to clients) the true one.
- **Accounting**: per-round aggregated train/eval metrics, bytes of arrays sent both ways, and
  the number of clients that trained, collected in :attr:`records` for the results writer.
  Client metrics are averaged weighted by examples, whatever the arrays are weighted by; privacy
  spent (:data:`MAX_METRICS`) is the maximum over the clients, not an average.
- **Client-local arrays** (``local_keys``): never sent to clients, never expected back, kept in
  the global model unchanged (FedBN's BatchNorm state; empty for the other strategies). A
  strategy may keep further arrays at their global value in some rounds (:meth:`kept_keys`; FixBN).
- **Errors**: a client's error reply stops the run with one clear line instead of being skipped.
- **Server state** for checkpoints: FedAvgM's momentum, FedAdam's moments (:meth:`state_dict`).

Only Flower's public API is used: the public strategy classes and their constructor parameters,
``Message``, ``ArrayRecord`` and ``MetricRecord``. Where Flower 1.41 offers no public way (the
server optimizers' state), :meth:`FedknStrategy.state_dict` says so and a test fails loudly when
Flower changes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedkn.errors import DivergedError, FedknError
from fedkn.protocol import ERROR_CODE_DIVERGED, LOST_NODE_CODES, MAX_METRICS, WEIGHT_KEY
from fedkn.sampling import sample_partitions, sample_size

log = logging.getLogger("fedkn")


@dataclass
class RoundRecord:
    """What one round produced, for metrics.csv."""

    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    clients_trained: int = 0
    clients_evaluated: int = 0


class ClientFailure(FedknError):
    """A client replied with an error; the message is the client's own one-line reason."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class ClientDiverged(ClientFailure, DivergedError):
    """A client's local training diverged (its reply carried :data:`ERROR_CODE_DIVERGED`)."""

    def __init__(self, message: str, detail: str = "") -> None:
        DivergedError.__init__(self, message)
        self.detail = detail


def _arrays_nbytes(record: ArrayRecord) -> int:
    return int(record.count_bytes())


def _reply_arrays(msg: Message) -> Iterable[ArrayRecord]:
    return msg.content.array_records.values()


class FedknStrategy(Strategy):
    """Mixin: put it first, e.g. ``class FedknFedAvg(FedknStrategy, FedAvg)``."""

    # FedAvg's public sampling parameters (every fedkn strategy derives from Flower's FedAvg).
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int

    def __init__(
        self, *args: Any, seed: int = 0, local_keys: Iterable[str] = (), min_clients: int = 1, **kwargs: Any
    ) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_metrics)
        super().__init__(*args, **kwargs)
        self.seed = int(seed)
        self.min_clients = int(min_clients)
        self._sent: dict[tuple[int, str], tuple[list[int], list[Message]]] = {}  # (round, phase) -> (sampled, sent)
        self.local_keys: frozenset[str] = frozenset(local_keys)
        self.round_offset = 0
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.records: dict[int, RoundRecord] = {}
        self._global_arrays: ArrayRecord | None = None

    # -- wiring -------------------------------------------------------------------------------------
    def bind(self, partition_of: Mapping[int, int], *, round_offset: int = 0) -> None:
        """Node id -> partition id of every client, and the number of rounds already done."""
        self.partition_of = {int(n): int(p) for n, p in partition_of.items()}
        self.node_of = {p: n for n, p in self.partition_of.items()}
        if len(self.node_of) != len(self.partition_of):
            raise FedknError("two SuperNodes report the same partition id; check their node config")
        self.round_offset = int(round_offset)

    def record(self, server_round: int) -> RoundRecord:
        return self.records.setdefault(server_round, RoundRecord())

    @property
    def num_partitions(self) -> int:
        return len(self.node_of)

    # -- sampling -------------------------------------------------------------------------------------
    def _online(self, grid: Any, server_round: int, phase: str) -> set[int]:
        """Node ids of the SuperNodes online now; fewer than min-clients of the federation's stops the run."""
        online = {int(n) for n in grid.get_node_ids()}
        if not self.node_of:
            return online
        alive = [p for p, n in self.node_of.items() if n in online]
        if len(alive) < self.min_clients:
            lost = sorted(p for p, n in self.node_of.items() if n not in online)
            raise FedknError(
                f"round {server_round} ({phase}): only {len(alive)} of {len(self.node_of)} SuperNodes are online "
                f"(lost clients {lost}), fewer than min-clients={self.min_clients}; the run stops, "
                f"rounds up to {server_round - 1} are saved"
            )
        return online

    def _resample(self, messages: list[Message], server_round: int, phase: str, online: set[int]) -> list[Message]:
        """Flower's sample size for the whole federation, sent to the seeded sample of partitions;
        sampled partitions whose SuperNode is offline are skipped (they count as lost)."""
        if not messages or not self.node_of:
            return messages
        if phase == "train":
            k = sample_size(self.num_partitions, self.fraction_train, self.min_train_nodes)
        else:
            k = sample_size(self.num_partitions, self.fraction_evaluate, self.min_evaluate_nodes)
        pids = sample_partitions(self.num_partitions, k, seed=self.seed, server_round=server_round, phase=phase)
        content = messages[0].content
        mtype = MessageType.TRAIN if phase == "train" else MessageType.EVALUATE
        alive = [p for p in pids if self.node_of[p] in online]
        out = [Message(content=content, message_type=mtype, dst_node_id=self.node_of[p]) for p in alive]
        self._sent[(server_round, phase)] = (pids, out)
        return out

    def _strip_local(self, arrays: ArrayRecord) -> ArrayRecord:
        if not self.local_keys:
            return arrays
        return ArrayRecord({k: v for k, v in arrays.items() if k not in self.local_keys})

    def check_replies(self, replies: Iterable[Message], server_round: int, phase: str) -> list[Message]:
        """Replies sorted by partition id. A client's own error stops the run; a lost SuperNode
        (offline when sampled, no heartbeat, no reply within round-timeout) is dropped while at
        least min-clients replies remain, else the run stops with one line."""
        replies = list(replies)
        sampled, sent = self._sent.pop((server_round, phase), (None, []))
        pid_of_msg = {m.metadata.message_id: self.partition_of.get(m.metadata.dst_node_id) for m in sent}
        good: list[Message] = []
        why: dict[int, str] = {}
        for msg in replies:
            pid = self.partition_of.get(msg.metadata.src_node_id, pid_of_msg.get(msg.metadata.reply_to_message_id, "?"))
            if msg.has_error():
                reason = str(msg.error.reason)
                if int(msg.error.code) in LOST_NODE_CODES:
                    if isinstance(pid, int):
                        why[pid] = "SuperNode unavailable (no heartbeat)"
                    continue
                failure = ClientDiverged if int(msg.error.code) == ERROR_CODE_DIVERGED else ClientFailure
                raise failure(f"client {pid} failed in round {server_round} ({phase}): {_last_line(reason)}", detail=reason)
            good.append(msg)
        if sampled is not None:
            replied = {self.partition_of.get(m.metadata.src_node_id) for m in good}
            sent_pids = set(pid_of_msg.values())
            for p in sampled:
                if p not in replied and p not in why:
                    why[p] = "no reply within round-timeout" if p in sent_pids else "SuperNode offline"
            if why:
                lost = "; ".join(f"client {p}: {w}" for p, w in sorted(why.items()))
                if len(good) < min(self.min_clients, len(sampled)):
                    raise FedknError(
                        f"round {server_round} ({phase}): {len(good)} of {len(sampled)} sampled clients replied, fewer "
                        f"than min-clients={self.min_clients} ({lost}); the run stops, rounds up to {server_round - 1} are saved"
                    )
                log.warning("round %d (%s): continuing with %d of %d clients (%s)", server_round, phase, len(good), len(sampled), lost)
        return sorted(good, key=lambda m: self.partition_of.get(m.metadata.src_node_id, m.metadata.src_node_id))

    # -- train ------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Iterable[Message]:
        r = server_round + self.round_offset
        self._global_arrays = arrays
        send = self._strip_local(arrays)
        online = self._online(grid, r, "train")
        messages = self._resample(list(super().configure_train(r, send, config, grid)), r, "train", online)
        self.record(r).bytes_sent += _arrays_nbytes(send) * len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = server_round + self.round_offset
        replies = self.check_replies(replies, r, "train")
        rec = self.record(r)
        rec.bytes_sent += sum(_arrays_nbytes(a) for m in replies for a in _reply_arrays(m))
        rec.clients_trained = len(replies)
        if not replies:
            raise FedknError(f"no client replied in round {r} within round-timeout; raise round-timeout or check the clients")
        weighted = [m for m in replies if _weight(m) > 0]
        if not weighted:  # every sampled client had no training data: keep the model
            return None, None
        arrays, metrics = super().aggregate_train(r, weighted)
        kept = self.kept_keys(r)
        if arrays is not None and kept and self._global_arrays is not None:
            merged = ArrayRecord()
            for k, v in self._global_arrays.items():  # keep the global key order
                merged[k] = v if k in kept else arrays[k]
            arrays = merged
        if metrics is not None:
            rec.train = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
        return arrays, metrics

    def kept_keys(self, server_round: int) -> frozenset[str]:
        """Arrays whose global value survives round ``server_round``'s aggregation: the client-local
        ones (FedBN); FixBN adds its frozen statistics."""
        return self.local_keys

    # -- evaluate ------------------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Iterable[Message]:
        r = server_round + self.round_offset
        send = self._strip_local(arrays)
        online = self._online(grid, r, "evaluate")
        messages = self._resample(list(super().configure_evaluate(r, send, config, grid)), r, "evaluate", online)
        self.record(r).bytes_sent += _arrays_nbytes(send) * len(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        r = server_round + self.round_offset
        replies = self.check_replies(replies, r, "evaluate")
        rec = self.record(r)
        rec.clients_evaluated = len(replies)
        weighted = [m for m in replies if _weight(m) > 0]
        if not weighted:
            return None
        metrics = super().aggregate_evaluate(r, weighted)
        if metrics is not None:
            rec.evaluate = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
        return metrics

    # -- server optimizer state, for checkpoints ---------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Server-side state that a resumed run needs (FedAvgM's momentum, FedAdam's moments).

        Flower 1.41 has no public API for a strategy's state: its server optimizers keep it in
        public instance attributes that hold arrays (a list, or a name -> array dict). Every such
        attribute is saved under its own name, whatever it is called, as ``name[i]`` or
        ``name.key``. ``tests/test_strategies.py`` resumes FedAvgM and FedAdam from this state and
        requires the uninterrupted result bit for bit, so a Flower release that moves the state
        elsewhere fails there, loudly.
        """
        out: dict[str, np.ndarray] = {}
        for name, value in vars(self).items():
            if isinstance(value, list) and value and all(isinstance(a, np.ndarray) for a in value):
                out.update({f"{name}[{i}]": np.asarray(a) for i, a in enumerate(value)})
            elif isinstance(value, dict) and value and all(isinstance(a, np.ndarray) for a in value.values()):
                out.update({f"{name}.{k}": np.asarray(a) for k, a in value.items()})
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` saved; state this strategy has no attribute for is an error."""
        lists: dict[str, dict[int, np.ndarray]] = {}
        dicts: dict[str, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            if key.endswith("]") and "[" in key:
                name, _, index = key[:-1].partition("[")
                lists.setdefault(name, {})[int(index)] = np.asarray(value)
            else:
                name, _, rest = key.partition(".")
                dicts.setdefault(name, {})[rest] = np.asarray(value)
        for name in (*lists, *dicts):
            if name.startswith("_") or not hasattr(self, name):
                raise FedknError(f"checkpoint holds strategy state '{name}' that {type(self).__name__} does not have; "
                                 "was it written with another strategy?")
        for name, items in lists.items():
            setattr(self, name, [items[i] for i in sorted(items)])
        for name, d in dicts.items():
            setattr(self, name, d)


def aggregate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Clients' metrics: the mean weighted by examples (``weighted_by_key`` weighs only the arrays),
    and the maximum for :data:`MAX_METRICS`.

    The mean is Flower 1.41's FedAvg metric average restated (its helper is not public API), with
    the same float operations in the same order: weight factors ``w / sum(w)``, then the running
    sum of ``value * factor`` in reply order, lists elementwise; the weight itself is left out.
    """
    weights = [_first_metric(r, WEIGHT_KEY) for r in records]
    total = sum(weights)
    out = MetricRecord()
    for record, weight in zip(records, [w / total for w in weights], strict=True):
        for metrics in record.metric_records.values():
            for key, value in metrics.items():
                if key == WEIGHT_KEY:
                    continue
                term = [v * weight for v in value] if isinstance(value, list) else value * weight
                prev = out.get(key)
                if prev is None:
                    out[key] = term
                elif isinstance(prev, list) and isinstance(term, list):
                    out[key] = [a + b for a, b in zip(prev, term, strict=True)]
                elif isinstance(prev, (int, float)) and isinstance(term, (int, float)):
                    out[key] = prev + term
                else:
                    raise FedknError(f"clients reported metric '{key}' as a list and as a number")
    for key in MAX_METRICS:
        values = [_number(m[key]) for r in records for m in r.metric_records.values() if key in m]
        if values:
            out[key] = max(values)
    return out


def _number(value: Any) -> float:
    """A scalar metric as a float (a list-valued one is a client bug: no number to weigh by)."""
    if isinstance(value, list):
        raise FedknError(f"a client reported a list where a number was expected: {value!r}")
    return float(value)


def _first_metric(record: RecordDict, key: str) -> float:
    """``key`` of the reply's first MetricRecord; 0 when the reply has none or lacks the key."""
    metrics = next(iter(record.metric_records.values()), None)
    return 0.0 if metrics is None or key not in metrics else _number(metrics[key])


def _weight(msg: Message) -> float:
    return _first_metric(msg.content, WEIGHT_KEY)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\\n", "\n").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "FedknError:" in ln:
            return ln.split("FedknError:", 1)[1].strip().rstrip("'>")
    return lines[-1].rstrip("'>") if lines else "unknown error"


def to_array_record(state: Mapping[str, Any]) -> ArrayRecord:
    """name -> ndarray/tensor mapping as an ArrayRecord (key order kept)."""
    out = ArrayRecord()
    for k, v in state.items():
        out[k] = Array(np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v))
    return out
