"""Run one RunConfig into a run directory on Flower's simulation engine: what ``fedkn run`` and
every ``fedkn compare`` cell do, written once.

Failures of any layer (a client's FedknError, the server's, Flower/Ray infrastructure) become one
:class:`FedknError` line that names where the finished rounds are; details go to ``flower.log``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from fedkn.config import RunConfig
from fedkn.errors import DivergedError, FedknError
from fedkn.recorder import RunSummary
from fedkn.results import RunDir


def run_in_dir(
    cfg: RunConfig,
    run_dir: RunDir,
    *,
    progress: Callable[[dict[str, Any], RunConfig], None] | None = None,
    verbose: bool = False,
    ray_address: str | None = None,
    on_interrupt: Callable[[], None] | None = None,
) -> RunSummary:
    """Run (or resume, when ``run_dir`` holds a checkpoint) ``cfg``; return the final summary.

    KeyboardInterrupt propagates to the caller. Several calls in one process are fine: each starts
    and stops its own Ray instance unless ``ray_address`` names a running cluster.
    """
    # Heavy imports (torch, Flower, Ray) only when a run really starts.
    from fedkn.app import client_app
    from fedkn.app.server_app import make_server_app
    from fedkn.app.simulation import simulate

    where = f"results so far: {run_dir.path}"
    result: Future[RunSummary] = Future()
    server_app = make_server_app(cfg, run_dir, progress=progress, result=result)
    try:
        simulate(
            server_app,
            client_app.app,
            num_clients=cfg.data.num_clients,
            num_cpus=cfg.run.client_num_cpus,
            num_gpus=cfg.run.client_num_gpus,
            log_file=run_dir.path / "flower.log",
            verbose=verbose,
            ray_address=ray_address,
            on_interrupt=on_interrupt,
        )
    except FedknError as err:
        raise _located(err, where) from None
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - Flower/Ray infrastructure failure: one line, details in the log
        if isinstance(server_error := _server_error(result), FedknError):
            raise _located(server_error, where) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FedknError(f"the simulation failed: {first} (details: {run_dir.path / 'flower.log'}; {where})") from None
    if isinstance(server_error := _server_error(result), FedknError):  # raised in the server thread, swallowed upstream
        raise _located(server_error, where)
    summary = result.result() if result.done() and server_error is None else RunSummary.read(run_dir.path)
    if not summary.finished:
        raise FedknError(f"the run did not finish (status {summary.status}); see {run_dir.path}")
    return summary


def _server_error(result: Future[RunSummary]) -> BaseException | None:
    """The exception that stopped the server app, if it stopped with one."""
    return result.exception() if result.done() else None


def _located(err: FedknError, where: str) -> FedknError:
    """``err`` with the run's location appended; a divergence stays a :class:`DivergedError`."""
    if isinstance(err, DivergedError):
        return DivergedError(err.reason, where)
    return FedknError(f"{err} ({where})")
