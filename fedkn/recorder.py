"""A run's record while it runs: the results layer's side of a federated run.

:class:`RunRecorder` owns what a run leaves behind as it goes: the metrics history (resumed from
metrics.csv), the wall clock, and the run directory. The server app calls :meth:`~RunRecorder.round`
once per finished round and :meth:`~RunRecorder.finish` once at the end; the summary it writes is a
:class:`~fedkn.summary.RunSummary`. No Flower here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch

from fedkn import __version__
from fedkn.config import RunConfig
from fedkn.protocol import DP_EPSILON, DP_EPSILON_ROUND, EVAL_ACCURACY, EVAL_LOSS, TRAIN_ACCURACY, TRAIN_LOSS
from fedkn.results import RunDir
from fedkn.summary import RunSummary

Progress = Callable[[dict[str, Any], RunConfig], None]
def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


class RunRecorder:
    """History, clock and run directory of one run (fresh or resumed after a checkpoint).

    ``extra(summary)`` adds what the layers above know to every summary (the privacy statements,
    FedBN's note); ``progress(row, cfg)`` is told of every recorded round.
    """

    def __init__(
        self,
        run_dir: RunDir,
        cfg: RunConfig,
        *,
        model_parameters: int,
        device: str,
        centralized: bool,
        extra: Callable[[RunSummary], Mapping[str, Any]] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.run_dir, self.cfg = run_dir, cfg
        self.model_parameters, self.device, self.centralized = model_parameters, device, centralized
        self.extra, self.progress = extra, progress
        self.history: list[dict[str, Any]] = []
        self.elapsed_before = 0.0
        self.session_start = self.last_tick = time.perf_counter()

    def resume(self, checkpoint_round: int | None) -> None:
        """Keep metrics.csv's rows up to ``checkpoint_round`` (all of them go without a checkpoint)."""
        if checkpoint_round is not None:
            self.history = self.run_dir.truncate_metrics(checkpoint_round)
        elif self.run_dir.metrics_path.exists():
            self.history = self.run_dir.truncate_metrics(-1)
        self.elapsed_before = float(self.history[-1]["elapsed_s"]) if self.history else 0.0

    def tick(self) -> None:
        """Restart the round clock (a round's time runs from here to its :meth:`round`)."""
        self.last_tick = time.perf_counter()

    def round(
        self,
        r: int,
        *,
        test: tuple[float, float],
        train: Mapping[str, float],
        evaluate: Mapping[str, float],
        clients_trained: int,
        bytes_sent: int,
        checkpoint: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
    ) -> dict[str, Any]:
        """Record round ``r``: its metrics.csv row, the checkpoint (model, strategy state), the
        running summary; then tell ``progress``. ``test`` is (loss, accuracy), nan when not scored."""
        now = time.perf_counter()
        eps_round = eps = math.nan
        if self.cfg.privacy.enabled:  # a client's cumulative epsilon never falls, so the running max is the max over all clients
            eps_round = train.get(DP_EPSILON_ROUND, 0.0)
            eps = max(float(self.history[-1]["dp_epsilon"]) if self.history else 0.0, train.get(DP_EPSILON, 0.0))
        row = {
            "round": r,
            "test_loss": test[0],
            "test_accuracy": test[1],
            "fed_eval_loss": evaluate.get(EVAL_LOSS, math.nan),
            "fed_eval_accuracy": evaluate.get(EVAL_ACCURACY, math.nan),
            "train_loss": train.get(TRAIN_LOSS, math.nan),
            "train_accuracy": train.get(TRAIN_ACCURACY, math.nan),
            "clients_trained": clients_trained,
            "bytes_sent": bytes_sent,
            "round_time_s": round(now - self.last_tick, 3),
            "elapsed_s": round(self.elapsed_before + now - self.session_start, 3),
            "dp_epsilon_round": eps_round,
            "dp_epsilon": eps,
        }
        self.last_tick = now
        self.run_dir.append_metrics(row)
        self.history.append(row)
        if checkpoint is not None:
            self.run_dir.save_checkpoint(r, *checkpoint)
            if r >= self.cfg.federation.first_kept_round:
                self.run_dir.save_kept_model(r, checkpoint[0])
        self.run_dir.write_summary(self.summary("running").to_json())
        if self.progress is not None:
            self.progress(row, self.cfg)
        return row

    def summary(self, status: str, error: str | None = None) -> RunSummary:
        cfg, history = self.cfg, self.history
        last = history[-1] if history else {}
        tested = [r for r in history if r["round"] > 0 and not _nan(r["test_accuracy"])]
        best = max(tested, key=lambda r: r["test_accuracy"]) if tested else {}
        out = RunSummary(
            name=cfg.run_name,
            status=status,
            run_dir=str(self.run_dir.path),
            rounds_completed=int(last.get("round", 0)),
            num_rounds=cfg.federation.num_rounds,
            dataset=cfg.data.dataset,
            model=cfg.model.name,
            norm=cfg.model.norm,
            strategy=cfg.federation.strategy,
            num_clients=cfg.data.num_clients,
            final_test_accuracy=last.get("test_accuracy"),
            final_test_loss=last.get("test_loss"),
            final_fed_eval_accuracy=last.get("fed_eval_accuracy"),
            final_fed_eval_loss=last.get("fed_eval_loss"),
            final_train_loss=last.get("train_loss"),
            best_test_accuracy=best.get("test_accuracy"),
            best_round=best.get("round"),
            total_bytes_sent=int(sum(r["bytes_sent"] for r in history)),
            elapsed_s=last.get("elapsed_s", self.elapsed_before),
            model_parameters=self.model_parameters,
            device=self.device,
            centralized_evaluation=self.centralized,
            fedkn_version=__version__,
            config=cfg.to_flower(),
            error=error or None,
        )
        if cfg.privacy.enabled:  # the last row's running max over the clients
            out = replace(out, dp_epsilon=float(last.get("dp_epsilon") or 0.0), dp_delta=cfg.privacy.delta)
        return replace(out, **self.extra(out)) if self.extra is not None else out

    def finish(self, status: str, error: str | None = None) -> RunSummary:
        """Write the final summary and the plot. A failure to write them is only logged: the
        finished rounds are on disk already, and the run's own error must not be masked."""
        final = self.summary(status, error)
        try:
            self.run_dir.write_summary(final.to_json())
            cfg = self.cfg
            self.run_dir.plot(title=f"{cfg.run_name} ({cfg.data.dataset}, {cfg.data.num_clients} clients, {cfg.data.partition})")
        except Exception as err:  # noqa: BLE001 - see the docstring
            logging.getLogger("fedkn").warning("could not write summary/plot: %s", err)
        return final
