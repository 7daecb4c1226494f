"""Run the ServerApp and ClientApp on Flower's simulation engine (Ray), in this process.

:func:`simulate` is the only place that calls ``flwr.simulation.run_simulation`` (deprecated in
Flower 1.41 in favour of ``flwr run``); swap the call here when Flower removes it. Flower's and
Ray's own console output is kept down (errors only) so fedkn's per-round lines stay readable;
``verbose=True`` shows everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

#: Set before Ray starts: no usage stats, no telemetry, no GPU-override FutureWarning, no dedup chatter.
QUIET_ENV: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_DISABLE_IMPORT_WARNING": "1",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


def backend_config(
    num_cpus: float, num_gpus: float, *, verbose: bool = False, ray_address: str | None = None
) -> dict[str, Any]:
    """Ray backend settings: resources per ClientApp (e.g. ``num_gpus=0.25``: four per GPU).

    ``ray_address`` (``host:port`` of a ``ray start --head`` node): attach to that Ray cluster
    instead of starting a private one, so the ClientApps spread over all of its machines.
    """
    cpus: int | float = int(num_cpus) if float(num_cpus).is_integer() else num_cpus
    init_args: dict[str, Any] = {
        "logging_level": "INFO" if verbose else "ERROR",
        "log_to_driver": verbose,
        "include_dashboard": False,
    }
    if ray_address:
        init_args["address"] = ray_address
    return {"client_resources": {"num_cpus": cpus, "num_gpus": float(num_gpus)}, "init_args": init_args}


@contextlib.contextmanager
def quiet_flower(log_file: str | os.PathLike[str] | None = None, verbose: bool = False) -> Iterator[None]:
    """Flower's console output off (kept in ``log_file`` instead) and Ray's chatter down.

    With ``verbose`` nothing is hidden. Without it, everything Flower logs (INFO and up,
    tracebacks of infrastructure failures included) goes to ``log_file`` only.
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    flwr_logger = logging.getLogger("flwr")
    file_handler = None
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        flwr_logger.addHandler(file_handler)
    consoles = [h for h in flwr_logger.handlers if h is not file_handler] if not verbose else []
    console_levels = [h.level for h in consoles]
    others = [logging.getLogger(n) for n in ("ray", "filelock")] if not verbose else []
    other_levels = [lg.level for lg in others]
    for h in consoles:
        h.setLevel(logging.CRITICAL + 1)
    for lg in others:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore", category=DeprecationWarning)
                warnings.simplefilter("ignore", category=FutureWarning)
            yield
    finally:
        for h, level in zip(consoles, console_levels):
            h.setLevel(level)
        for lg, level in zip(others, other_levels):
            lg.setLevel(level)
        if file_handler is not None:
            flwr_logger.removeHandler(file_handler)
            file_handler.close()


def simulate(
    server_app: ServerApp,
    client_app: ClientApp,
    *,
    num_clients: int,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    log_file: str | os.PathLike[str] | None = None,
    verbose: bool = False,
    ray_address: str | None = None,
    on_interrupt: Callable[[], None] | None = None,
) -> None:
    """Run ``server_app`` with ``num_clients`` virtual SuperNodes executing ``client_app``.

    Ctrl-C calls ``on_interrupt`` and ends the process with status 130 right away: letting the
    KeyboardInterrupt unwind through Flower's worker threads while Ray shuts down can crash the
    interpreter, and Flower's ServerApp thread would otherwise wait for replies until its timeout.
    Results are safe: every finished round is already on disk.
    """
    from flwr.simulation import run_simulation

    # The ServerApp runs in this process with torch's own thread count (one per core): Flower's
    # round loop is synchronous, so the centralized test evaluation runs while every Ray actor
    # waits for its next message, and it may use all the cores. Limiting it to one client's share
    # made it about a fifth of a CPU cell's time; the scores are bit-identical either way.
    with quiet_flower(log_file, verbose), _interrupt_handler(on_interrupt):
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_name="ray",
            backend_config=backend_config(num_cpus, num_gpus, verbose=verbose, ray_address=ray_address),
            verbose_logging=False,
        )


@contextlib.contextmanager
def _interrupt_handler(on_interrupt: Callable[[], None] | None) -> Iterator[None]:
    if on_interrupt is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        try:
            on_interrupt()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
