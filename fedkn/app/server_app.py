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

import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedkn.app import task
from fedkn.app.engine import partitions_mismatch
from fedkn.config import RunConfig
from fedkn.data import Federation
from fedkn.errors import FedknError
from fedkn.local_state import local_keys
from fedkn.nn.batchnorm import batchnorm_stat_keys
from fedkn.protocol import CLIENT_STATE_DIR, CONFIG_RECORD, NUM_PARTITIONS, PARTITION_ID, TEST_ACCURACY, TEST_LOSS
from fedkn.recorder import Progress, RunRecorder, RunSummary
from fedkn.results import RunDir
from fedkn.train import default_device, device_label, evaluate
from strategies import ClientFailure, RoundRecord, build_strategy

NODE_WAIT_S = 60.0  # how long to wait for all SuperNodes to connect


def format_progress(row: dict[str, Any], cfg: RunConfig) -> str:
    def pct(v: Any) -> str:
        return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}%"

    def num(v: Any) -> str:
        return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    line = (
        f"round {row['round']:>3}/{cfg.federation.num_rounds}  test acc {pct(row['test_accuracy'])}  loss {num(row['test_loss'])}"
        f"  | clients acc {pct(row['fed_eval_accuracy'])}  | train loss {num(row['train_loss'])}"
    )
    if cfg.privacy.enabled:
        line += f"  | eps {num(row['dp_epsilon'])}"
    return line + f"  | {row['elapsed_s']:6.1f}s"


def dp_sgd_statement(cfg: RunConfig, eps: float, rounds: int) -> str:
    """What a DP-SGD run's ``eps`` (max cumulative epsilon over the clients) guarantees."""
    noise = (f"noise calibrated to target epsilon {cfg.privacy.target_epsilon:g} over {cfg.federation.num_rounds} rounds"
             if cfg.privacy.target_epsilon > 0 else f"noise multiplier {cfg.privacy.noise_multiplier:g}")
    return (
        f"sample-level (epsilon = {eps:.3g}, delta = {cfg.privacy.delta:g})-DP for every client's training data after "
        f"{rounds} rounds (DP-SGD with per-sample clipping to {cfg.privacy.max_grad_norm:g}, {noise}, {cfg.privacy.accountant} "
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
                Message(content=RecordDict({CONFIG_RECORD: ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in node_ids
            ]
            for reply in grid.send_and_receive(messages, timeout=max(1.0, deadline - time.monotonic())):
                if reply.has_error():
                    reason = str(reply.error.reason).strip().splitlines()[-1] if str(reply.error.reason).strip() else "?"
                    raise FedknError(f"a SuperNode did not say which partition it holds: {reason.removeprefix('FedknError: ')}")
                metrics = next(iter(reply.content.metric_records.values()))
                total = int(metrics[NUM_PARTITIONS])
                if total != num_clients:
                    raise partitions_mismatch(total, num_clients)
                known[reply.metadata.src_node_id] = int(metrics[PARTITION_ID])
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


def server_strategy(cfg: RunConfig, model: torch.nn.Module) -> tuple[Strategy, list[str], Callable[[RunSummary], dict[str, Any]]]:
    """The configured strategy (wrapped for client-level DP), the model keys that stay on the
    clients, and what a summary adds (the privacy statements, FedBN's note)."""
    kept = local_keys(cfg.federation, model)
    strategy: Strategy = build_strategy(cfg.federation, seed=cfg.run.seed, client_lr=cfg.train.lr,
                                        uniform_weights=cfg.client_dp.enabled, local_keys=kept,
                                        stat_keys=batchnorm_stat_keys(model))
    sampled, client_dp = cfg.clients_per_round, cfg.client_dp
    if client_dp.enabled:
        from strategies.dp import client_level_guarantee, wrap_strategy

        strategy = wrap_strategy(strategy, client_dp, num_sampled_clients=sampled, strategy_name=cfg.federation.strategy)

    def extra(summary: RunSummary) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if summary.dp_epsilon is not None:
            out["dp_statement"] = dp_sgd_statement(cfg, summary.dp_epsilon, summary.rounds_completed)
        if client_dp.enabled:
            out["client_dp"] = client_level_guarantee(
                client_dp.noise_multiplier, sampled, cfg.data.num_clients, summary.rounds_completed, client_dp.delta).as_dict()
        if cfg.federation.keeps_local_state:
            out["note"] = "FedBN keeps BatchNorm on the clients: use fed_eval (clients' test splits), not test"
        return out

    return strategy, kept, extra


class RoundEnd:
    """Flower's ``evaluate_fn``: after each round, score the global model on the global test set
    (every ``eval-every`` rounds, never under FedBN, whose global model lacks trained BatchNorm
    state) and hand the round to the recorder, with the checkpoint."""

    def __init__(self, cfg: RunConfig, strategy: Strategy, recorder: RunRecorder, fed: Federation, start_round: int) -> None:
        self.cfg, self.strategy, self.recorder, self.fed, self.start_round = cfg, strategy, recorder, fed, start_round
        self.model = task.new_model(cfg, fed.train_set)
        self.test_pre = task.preprocess(cfg, fed.test_set, train=False)

    def test(self, arrays: ArrayRecord, r: int) -> tuple[float, float]:
        # eval-every > 1 trades the resolution of the test curve for time (a 10k-image test set can
        # cost more than a round's training on a CPU); round 0 and the final round are always scored.
        if not self.cfg.federation.evaluates_centrally(r):
            return math.nan, math.nan
        task.load_weights(self.model, dict(arrays.to_torch_state_dict()))
        res = evaluate(self.model, self.fed.test_set, None, self.cfg.train.eval_batch_size, default_device(), self.test_pre)
        return res.loss, res.accuracy

    def __call__(self, local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        r = local_round + self.start_round
        if local_round == 0 and self.start_round > 0:
            self.recorder.tick()
            return None  # round `start_round` is already in metrics.csv
        test_loss, test_acc = self.test(arrays, r)
        rec = self.strategy.records.pop(r, RoundRecord())
        checkpoint = (arrays.to_torch_state_dict(), _state_to_tensors(self.strategy.state_dict())) if r > 0 else None
        self.recorder.round(r, test=(test_loss, test_acc), train=rec.train, evaluate=rec.evaluate,
                            clients_trained=rec.clients_trained, bytes_sent=rec.bytes_sent, checkpoint=checkpoint)
        if math.isnan(test_acc):
            return None
        return MetricRecord({TEST_LOSS: test_loss, TEST_ACCURACY: test_acc})


def _federate(grid: Grid, cfg: RunConfig, strategy: Strategy, model: torch.nn.Module, round_end: RoundEnd,
              client_config: dict[str, Any]) -> None:
    """Find the SuperNodes' partitions, then run the remaining rounds with Flower's strategy loop."""
    partition_of = discover_partitions(grid, cfg.data.num_clients, cfg.federation.round_timeout)
    strategy.bind(partition_of, round_offset=round_end.start_round)
    remaining = cfg.federation.num_rounds - round_end.start_round
    if remaining <= 0:
        return
    initial = ArrayRecord.from_torch_state_dict(model.state_dict())
    round_end.recorder.tick()
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=remaining,
        timeout=cfg.federation.round_timeout,
        train_config=ConfigRecord(dict(client_config)),
        evaluate_config=ConfigRecord(dict(client_config)),
        evaluate_fn=round_end,
    )


def _failure(err: BaseException, run_dir: RunDir) -> tuple[str, str]:
    """(status, one-line error) of a run stopped by ``err``; details of unexpected ones go to error.log."""
    if isinstance(err, ClientFailure):
        _write_error_log(run_dir, f"{err}\n\n{err.detail}")
        return "failed", str(err)
    if isinstance(err, FedknError):
        return "failed", str(err)
    if isinstance(err, KeyboardInterrupt):
        return "interrupted", "interrupted"
    import traceback

    _write_error_log(run_dir, "".join(traceback.format_exception(err)))
    return "failed", f"{type(err).__name__}: {err}"


def run_server(
    grid: Grid,
    cfg: RunConfig,
    *,
    run_dir: RunDir | None = None,
    progress: Progress | None = print_progress,
    result: Future[RunSummary] | None = None,
) -> RunSummary:
    """Run (or resume, when ``run_dir`` holds a checkpoint) ``cfg`` and write its results.

    ``result`` receives the final summary, or the exception that stopped the run: Flower runs
    this in its own thread and does not pass either back to ``fedkn run``.
    """
    run_dir = run_dir if run_dir is not None else RunDir.create(cfg)
    fed = task.federation(cfg)
    model = task.new_model(cfg, fed.train_set)
    strategy, kept, extra = server_strategy(cfg, model)
    recorder = RunRecorder(run_dir, cfg, model_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                           device=device_label(default_device()), centralized=not cfg.federation.keeps_local_state,
                           extra=extra, progress=progress)
    ckpt = run_dir.load_checkpoint()
    if ckpt is not None:
        task.load_weights(model, ckpt.model)
        strategy.load_state_dict({k: v.numpy() for k, v in ckpt.strategy.items()})
    recorder.resume(ckpt.round if ckpt is not None else None)
    round_end = RoundEnd(cfg, strategy, recorder, fed, ckpt.round if ckpt is not None else 0)
    client_config = {**cfg.to_flower(), **({CLIENT_STATE_DIR: str(run_dir.client_state_dir)} if kept else {})}
    status, error = "failed", None
    try:
        _federate(grid, cfg, strategy, model, round_end, client_config)
        status = "finished"
    except BaseException as err:
        status, error = _failure(err, run_dir)
        if result is not None:
            result.set_exception(err)
        raise
    finally:
        final = recorder.finish(status, error)
    if result is not None:
        result.set_result(final)
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


def make_server_app(cfg: RunConfig, run_dir: RunDir, *, progress: Progress | None, result: Future[RunSummary]) -> ServerApp:
    """The same ServerApp for ``fedkn run``, with the parsed config and run directory baked in;
    ``result`` receives the final summary or the exception that stopped the run."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, run_dir=run_dir, progress=progress, result=result)

    return server_app


__all__ = [
    "RoundEnd",
    "app",
    "discover_partitions",
    "format_progress",
    "make_server_app",
    "print_progress",
    "run_server",
]
