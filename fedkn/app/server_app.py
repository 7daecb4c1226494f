"""The Flower ServerApp: runs the configured strategy and writes the run directory.

One function, :func:`run_server`, does the work for both ways of running:

- ``flwr run .``: Flower loads :data:`app`; its ``main`` parses ``context.run_config`` (the
  ``[tool.flwr.app.config]`` table plus ``--run-config`` overrides) and creates a fresh run
  directory under ``output-dir`` (relative to the directory ``flwr run`` was started from).
- ``fedkn run``: builds the app with :func:`make_server_app`, handing over the already parsed
  config, the run directory (fresh or resumed) and a progress callback.

Per round it records a row in metrics.csv as soon as the round finishes (centralized evaluation
of the global model on the global test set, the clients' federated evaluation, train loss, bytes
sent, time and, under DP-SGD, the privacy spent), then checkpoints the model and the strategy
state, so a crash loses nothing finished. Client-level DP wraps the strategy in Flower's DP
wrapper (:mod:`strategies.dp`); its guarantee goes into summary.json.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedkn import __version__
from fedkn.app import task
from fedkn.app.engine import partitions_mismatch
from fedkn.config import RunConfig
from fedkn.errors import FedknError
from fedkn.results import RunDir
from fedkn.train import default_device, evaluate
from strategies import ClientFailure, RoundRecord, batchnorm_keys, batchnorm_stat_keys, build_strategy, sample_size

Progress = Callable[[dict[str, Any], RunConfig], None]
NODE_WAIT_S = 60.0  # how long to wait for all SuperNodes to connect


@dataclass
class ServerOutcome:
    """Filled in by :func:`run_server`, read by ``fedkn run`` after the simulation returns."""

    run_dir: RunDir | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None


def format_progress(row: dict[str, Any], cfg: RunConfig) -> str:
    def pct(v: Any) -> str:
        return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}%"

    def num(v: Any) -> str:
        return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    line = (
        f"round {row['round']:>3}/{cfg.num_rounds}  test acc {pct(row['test_accuracy'])}  loss {num(row['test_loss'])}"
        f"  | clients acc {pct(row['fed_eval_accuracy'])}  | train loss {num(row['train_loss'])}"
    )
    if cfg.dp_sgd:
        line += f"  | eps {num(row['dp_epsilon'])}"
    return line + f"  | {row['elapsed_s']:6.1f}s"


def dp_sgd_statement(cfg: RunConfig, eps: float, rounds: int) -> str:
    """What a DP-SGD run's ``eps`` (max cumulative epsilon over the clients) guarantees."""
    noise = (f"noise calibrated to target epsilon {cfg.dp_target_epsilon:g} over {cfg.num_rounds} rounds"
             if cfg.dp_target_epsilon > 0 else f"noise multiplier {cfg.dp_noise_multiplier:g}")
    return (
        f"sample-level (epsilon = {eps:.3g}, delta = {cfg.dp_delta:g})-DP for every client's training data after "
        f"{rounds} rounds (DP-SGD with per-sample clipping to {cfg.dp_max_grad_norm:g}, {noise}, {cfg.dp_accountant} "
        "accountant; max over clients; add/remove one example; reported client metrics are not covered)"
    )


def print_progress(row: dict[str, Any], cfg: RunConfig) -> None:
    print(format_progress(row, cfg), flush=True)


# --------------------------------------------------------------------------------------------------
# node discovery
# --------------------------------------------------------------------------------------------------


def discover_partitions(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """Ask every SuperNode for its partition id; node id -> partition id for all ``num_clients``."""
    deadline = time.monotonic() + min(timeout, NODE_WAIT_S)
    known: dict[int, int] = {}
    while True:
        node_ids = [n for n in grid.get_node_ids() if n not in known]
        if node_ids:
            messages = [
                Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in node_ids
            ]
            for reply in grid.send_and_receive(messages, timeout=max(1.0, deadline - time.monotonic())):
                if reply.has_error():
                    reason = str(reply.error.reason).strip().splitlines()[-1] if str(reply.error.reason).strip() else "?"
                    raise FedknError(f"a SuperNode did not say which partition it holds: {reason.removeprefix('FedknError: ')}")
                metrics = next(iter(reply.content.metric_records.values()))
                total = int(metrics["num-partitions"])
                if total != num_clients:
                    raise partitions_mismatch(total, num_clients)
                known[reply.metadata.src_node_id] = int(metrics["partition-id"])
        if len(known) >= num_clients:
            break
        if time.monotonic() > deadline:
            raise FedknError(f"only {len(known)} of {num_clients} SuperNodes connected within {NODE_WAIT_S:.0f}s")
        time.sleep(0.5)
    if sorted(known.values()) != list(range(num_clients)):
        raise FedknError(f"SuperNodes report partition ids {sorted(known.values())}, expected 0..{num_clients - 1}")
    return known


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


def _state_to_tensors(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def run_server(
    grid: Grid,
    cfg: RunConfig,
    *,
    run_dir: RunDir | None = None,
    progress: Progress | None = print_progress,
    outcome: ServerOutcome | None = None,
) -> dict[str, Any]:
    """Run (or resume, when ``run_dir`` holds a checkpoint) ``cfg`` and write its results."""
    outcome = outcome if outcome is not None else ServerOutcome()
    run_dir = run_dir if run_dir is not None else RunDir.create(cfg)
    outcome.run_dir = run_dir
    session_start = time.perf_counter()

    fed = task.federation(cfg)
    model = task.new_model(cfg, fed.train_set)
    local_keys = batchnorm_keys(model) if cfg.local_keys_stay_local else []
    strategy = build_strategy(cfg, local_keys=local_keys, stat_keys=batchnorm_stat_keys(model))
    client_dp, sampled = None, sample_size(cfg.num_clients, cfg.fraction_train)
    if cfg.client_dp != "off":
        from strategies.dp import client_level_guarantee, settings_from_config, wrap_strategy

        client_dp = settings_from_config(cfg)
        strategy = wrap_strategy(strategy, client_dp, num_sampled_clients=sampled, strategy_name=cfg.strategy)
    central = cfg.strategy != "fedbn"  # FedBN's global model has no trained BatchNorm state
    test_pre = task.preprocess(cfg, fed.test_set, train=False)
    eval_model = task.new_model(cfg, fed.train_set)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    start_round, rows = 0, []
    ckpt = run_dir.load_checkpoint()
    if ckpt is not None:
        task.load_weights(model, ckpt.model)
        strategy.load_state_dict({k: v.numpy() for k, v in ckpt.strategy.items()})
        start_round = ckpt.round
        rows = run_dir.truncate_metrics(start_round)
    elif run_dir.metrics_path.exists():
        rows = run_dir.truncate_metrics(-1)
    elapsed_before = float(rows[-1]["elapsed_s"]) if rows else 0.0
    history = list(rows)

    def summary(status: str, error: str | None = None) -> dict[str, Any]:
        last = history[-1] if history else {}
        tested = [r for r in history if r["round"] > 0 and not math.isnan(r["test_accuracy"])]
        best = max(tested, key=lambda r: r["test_accuracy"]) if tested else {}
        out = {
            "name": cfg.run_name,
            "status": status,
            "run_dir": str(run_dir.path),
            "rounds_completed": int(last.get("round", 0)),
            "num_rounds": cfg.num_rounds,
            "dataset": cfg.dataset,
            "model": cfg.model,
            "norm": cfg.norm,
            "strategy": cfg.strategy,
            "num_clients": cfg.num_clients,
            "final_test_accuracy": last.get("test_accuracy"),
            "final_test_loss": last.get("test_loss"),
            "final_fed_eval_accuracy": last.get("fed_eval_accuracy"),
            "final_fed_eval_loss": last.get("fed_eval_loss"),
            "final_train_loss": last.get("train_loss"),
            "best_test_accuracy": best.get("test_accuracy"),
            "best_round": best.get("round"),
            "total_bytes_sent": int(sum(r["bytes_sent"] for r in history)),
            "elapsed_s": last.get("elapsed_s", elapsed_before),
            "model_parameters": num_params,
            "device": str(default_device()),
            "centralized_evaluation": central,
            "fedkn_version": __version__,
            "config": cfg.to_flower(),
        }
        if cfg.dp_sgd:
            eps = float(last.get("dp_epsilon") or 0.0)
            out.update(dp_epsilon=eps, dp_delta=cfg.dp_delta,
                       dp_statement=dp_sgd_statement(cfg, eps, out["rounds_completed"]))
        if client_dp is not None:
            out["client_dp"] = client_level_guarantee(
                client_dp.noise_multiplier, sampled, cfg.num_clients, out["rounds_completed"], client_dp.delta
            ).as_dict()
        if not central:
            out["note"] = "FedBN keeps BatchNorm on the clients: use fed_eval (clients' test splits), not test"
        if error:
            out["error"] = error
        return out

    def centralized(arrays: ArrayRecord, r: int) -> tuple[float, float]:
        # eval-every > 1 trades the resolution of the test curve for time (a 10k-image test set can
        # cost more than a round's training on a CPU); round 0 and the final round are always scored.
        if not central or (r % cfg.eval_every and r != cfg.num_rounds):
            return math.nan, math.nan
        task.load_weights(eval_model, dict(arrays.to_torch_state_dict()))
        res = evaluate(eval_model, fed.test_set, None, cfg.eval_batch_size, default_device(), test_pre)
        return res.loss, res.accuracy

    clock = {"last": time.perf_counter()}

    def evaluate_fn(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        r = local_round + start_round
        if local_round == 0 and start_round > 0:
            clock["last"] = time.perf_counter()
            return None  # round `start_round` is already in metrics.csv
        test_loss, test_acc = centralized(arrays, r)
        rec = strategy.records.pop(r, RoundRecord())
        now = time.perf_counter()
        eps_round = eps = math.nan
        if cfg.dp_sgd:  # a client's cumulative epsilon never falls, so the running max is the max over all clients
            eps_round = rec.train.get("dp-epsilon-round", 0.0)
            eps = max(float(history[-1]["dp_epsilon"]) if history else 0.0, rec.train.get("dp-epsilon", 0.0))
        row = {
            "round": r,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "fed_eval_loss": rec.evaluate.get("eval-loss", math.nan),
            "fed_eval_accuracy": rec.evaluate.get("eval-accuracy", math.nan),
            "train_loss": rec.train.get("train-loss", math.nan),
            "train_accuracy": rec.train.get("train-accuracy", math.nan),
            "clients_trained": rec.clients_trained,
            "bytes_sent": rec.bytes_sent,
            "round_time_s": round(now - clock["last"], 3),
            "elapsed_s": round(elapsed_before + now - session_start, 3),
            "dp_epsilon_round": eps_round,
            "dp_epsilon": eps,
        }
        clock["last"] = now
        run_dir.append_metrics(row)
        history.append(row)
        if r > 0:
            run_dir.save_checkpoint(r, arrays.to_torch_state_dict(), _state_to_tensors(strategy.state_dict()))
        run_dir.write_summary(summary("running"))
        if progress is not None:
            progress(row, cfg)
        if math.isnan(test_acc):
            return None
        return MetricRecord({"test-loss": test_loss, "test-accuracy": test_acc})

    status, error_line = "failed", None
    try:
        if hasattr(grid, "pull_interval"):  # simulation's InMemoryGrid polls for replies every 0.1 s
            grid.pull_interval = min(float(grid.pull_interval), 0.01)
        partition_of = discover_partitions(grid, cfg.num_clients, cfg.round_timeout)
        strategy.bind(partition_of, round_offset=start_round)
        remaining = cfg.num_rounds - start_round
        if remaining > 0:
            initial = ArrayRecord.from_torch_state_dict(model.state_dict())
            record = {**cfg.to_flower()}
            if local_keys:
                record["client-state-dir"] = str(run_dir.client_state_dir)
            clock["last"] = time.perf_counter()
            strategy.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=remaining,
                timeout=cfg.round_timeout,
                train_config=ConfigRecord(dict(record)),
                evaluate_config=ConfigRecord(dict(record)),
                evaluate_fn=evaluate_fn,
            )
        status = "finished"
    except ClientFailure as err:
        error_line = str(err)
        _write_error_log(run_dir, f"{err}\n\n{err.detail}")
        outcome.error = err
        raise
    except FedknError as err:
        error_line = str(err)
        outcome.error = err
        raise
    except KeyboardInterrupt as err:
        status, error_line = "interrupted", "interrupted"
        outcome.error = err
        raise
    except BaseException as err:
        import traceback

        error_line = f"{type(err).__name__}: {err}"
        _write_error_log(run_dir, traceback.format_exc())
        outcome.error = err
        raise
    finally:
        final = summary(status, error_line)
        outcome.summary = final
        try:
            run_dir.write_summary(final)
            run_dir.plot(title=f"{cfg.run_name} ({cfg.dataset}, {cfg.num_clients} clients, {cfg.partition})")
        except Exception as err:  # noqa: BLE001 - results already on disk; a plot failure must not mask the run's error
            logging.getLogger("fedkn").warning("could not write summary/plot: %s", err)
    return final


def _write_error_log(run_dir: RunDir, text: str) -> None:
    try:
        (run_dir.path / "error.log").write_text(text, encoding="utf-8")
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------
# the apps
# --------------------------------------------------------------------------------------------------

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run`` entry point: config from Flower's run config, a fresh run directory."""
    try:
        cfg = RunConfig.from_flower(context.run_config)
        run_dir = RunDir.create(cfg)
        print(f"fedkn: {cfg.run_name}: results in {run_dir.path}", flush=True)
        run_server(grid, cfg, run_dir=run_dir)
    except FedknError as err:
        print(f"fedkn: error: {err}", file=sys.stderr, flush=True)
        # Not SystemExit: Flower marks the run finished:failed with this line only for an Exception
        # (SystemExit skips its handler; the run then fails later as "No heartbeat received from the task").
        raise RuntimeError(f"fedkn: {err}") from None


def make_server_app(cfg: RunConfig, run_dir: RunDir, *, progress: Progress | None, outcome: ServerOutcome) -> ServerApp:
    """The same ServerApp for ``fedkn run``, with the parsed config and run directory baked in."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, run_dir=run_dir, progress=progress, outcome=outcome)

    return server_app


__all__ = [
    "ServerOutcome",
    "app",
    "discover_partitions",
    "format_progress",
    "make_server_app",
    "print_progress",
    "run_server",
]
