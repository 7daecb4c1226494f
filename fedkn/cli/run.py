"""``fedkn run``: one federated run on Flower's simulation engine, in this process.

    fedkn run                                  # the default: KernelNorm ResNet-8 on digits
    fedkn run --config configs/quickstart.toml --norm gn --set num-rounds=5 --set lr=0.02
    fedkn run --norm fedbn                     # BatchNorm with the FedBN strategy
    fedkn run --norm fixbn                     # BatchNorm with FixBN (statistics frozen after fixbn-round)
    fedkn run --norm nf --set batch-size=1     # normalization-free (FedWon), one sample per step
    fedkn run --resume runs/20250101-120000-resnet8-kn-fedavg

Prints one line per round (centralized test accuracy and loss, clients' accuracy, train loss,
elapsed time) and a summary; writes the run directory (see :mod:`fedkn.results`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from typing import Any

from fedkn.errors import FedknError

#: Keys that may change when resuming: they do not alter the rounds already run.
RESUMABLE_KEYS: frozenset[str] = frozenset({"num_rounds", "round_timeout", "client_num_cpus", "client_num_gpus"})


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a federated simulation (Flower + Ray) and write its results directory",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Config keys (kebab-case, as in pyproject's [tool.flwr.app.config]): see configs/*.toml.\n"
            "Precedence: defaults < --config file < --norm < --set."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="preset TOML file, e.g. configs/quickstart.toml")
    p.add_argument("--norm", help="normalization: kn, bn, gn, ln, nf, none, wsgn, fedbn (= bn with the FedBN strategy) "
                                  "or fixbn (= bn with FixBN)")
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override one config key (repeatable)"
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last finished round")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    p.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the clients on an existing Ray cluster (from `ray start --head`) instead of a local one",
    )
    p.set_defaults(func=run_command)


def resolve(args: argparse.Namespace) -> tuple[Any, Any, bool]:
    """(RunConfig, RunDir, resumed) from the parsed arguments."""
    from fedkn.config import RunConfig, parse_sets
    from fedkn.results import RunDir

    if args.resume:
        if args.config or args.norm:
            raise FedknError("--resume continues a run with its saved config; drop --config/--norm")
        run_dir = RunDir.open(args.resume)
        saved = run_dir.read_config()
        changes = parse_sets(args.sets)
        locked = sorted(k.replace("_", "-") for k in changes if k not in RESUMABLE_KEYS)
        if locked:
            allowed = ", ".join(sorted(k.replace("_", "-") for k in RESUMABLE_KEYS))
            raise FedknError(f"cannot change {', '.join(locked)} when resuming (only {allowed})")
        cfg = RunConfig.from_dict({**saved.to_flower(), **changes})
        if cfg.privacy.enabled and cfg.privacy.target_epsilon > 0 and cfg.federation.num_rounds != saved.federation.num_rounds:
            raise FedknError(
                f"cannot change num-rounds when resuming a run with dp-target-epsilon: its noise was calibrated "
                f"to {saved.federation.num_rounds} rounds (set dp-noise-multiplier instead for runs you want to extend)"
            )
        if cfg != saved:
            run_dir.write_config(cfg)
        return cfg, run_dir, True
    overrides = {"norm": args.norm} if args.norm else None
    cfg = RunConfig.from_sources(args.config, overrides, args.sets)
    return cfg, RunDir.create(cfg), False


def _mark_interrupted(run_dir: Any) -> None:
    """Record the interruption in summary.json and redraw the plot from the finished rounds."""
    from dataclasses import replace

    from fedkn.recorder import RunSummary

    with contextlib.suppress(Exception):  # best effort: metrics.csv and model.pt are already safe on disk
        run_dir.write_summary(replace(RunSummary.read(run_dir.path), status="interrupted").to_json())
        run_dir.plot()


def _interrupted(run_dir: Any) -> None:
    _mark_interrupted(run_dir)
    print(f"\nfedkn: interrupted; finished rounds are in {run_dir.path} (continue with --resume)", file=sys.stderr)


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def run_command(args: argparse.Namespace) -> int:
    cfg, run_dir, resumed = resolve(args)

    # Heavy imports (torch, Flower, Ray) only once the arguments are known to be good.
    from fedkn.app.runner import run_in_dir
    from fedkn.app.server_app import print_progress

    ckpt_round = 0
    if resumed:
        ckpt = run_dir.load_checkpoint()
        ckpt_round = ckpt.round if ckpt is not None else 0
        if ckpt_round >= cfg.federation.num_rounds:
            print(f"fedkn: {run_dir.path} already finished {ckpt_round} of {cfg.federation.num_rounds} rounds; nothing to do")
            print("  (extend it with --set num-rounds=N)")
            return 0
    print(
        f"fedkn run: {cfg.model.name} x{cfg.model.width:g} with {cfg.model.norm}, {cfg.federation.strategy}, {cfg.data.dataset} over "
        f"{cfg.data.num_clients} clients ({cfg.data.partition}), {cfg.federation.num_rounds} rounds, batch {cfg.train.batch_size}, lr {cfg.train.lr:g}, seed {cfg.run.seed}"
    )
    print(f"results: {run_dir.path}" + (f"  (resuming after round {ckpt_round})" if resumed else ""), flush=True)

    t0 = time.perf_counter()
    try:
        s = run_in_dir(
            cfg,
            run_dir,
            progress=print_progress,
            verbose=args.verbose,
            ray_address=args.ray_address,
            on_interrupt=lambda: _interrupted(run_dir),
        )
    except KeyboardInterrupt:
        _interrupted(run_dir)
        return 130
    wall = time.perf_counter() - t0
    best = f" (best {_pct(s.best_test_accuracy)} at round {s.best_round})" if s.best_round is not None else ""
    print(
        f"done: {s.rounds_completed} rounds in {wall:.1f}s wall  |  final test acc {_pct(s.final_test_accuracy)}{best}"
        f"  |  clients acc {_pct(s.final_fed_eval_accuracy)}  |  {s.total_bytes_sent / 1e6:.1f} MB sent"
    )
    if s.dp_statement:
        print(f"privacy: {s.dp_statement}")
    if s.client_dp:
        print(f"privacy: {s.client_dp['statement']}")
    if s.note:
        print(f"note: {s.note}")
    print(f"results: {run_dir.path}  (metrics.csv, summary.json, metrics.png, model.pt)")
    return 0
