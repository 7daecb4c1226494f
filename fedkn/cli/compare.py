"""``fedkn compare``: the same federated run over a grid of norms x partitions x seeds, and a report.

    fedkn compare --set num-rounds=10                       # default grid, 8 x 5 x 3 = 120 runs
    fedkn compare --config configs/compare-digits.toml --norms kn,gn,bn --partitions iid,dir0.1 --seeds 3
    fedkn compare ... --lr-grid log:0.005:0.2:5 --tune-rounds 5 --tune-on dir0.1
    fedkn compare ... --only norm=kn,partition=dir0.1,seed=0 --out /tmp/rerun
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedkn.errors import FedknError

if TYPE_CHECKING:  # the CLI imports the compare package only when the command runs
    from fedkn.compare.tuning import TuneSpec
    from fedkn.config import RunConfig

DESCRIPTION = """\
Run one federated configuration over a grid of normalizations x partitions x seeds, with
everything else identical, and write a report comparing them.

The grid. A cell is (norm, partition, seed): the base config (defaults < --config < --set) with
that norm, partition and seed. All cells of one seed share the client partition, the model
initialization seed, the client sampling and the local data order; the norm is the only change.
Cells run one after another in this process (each starts its own Ray instance, about 10 s) into
OUT/runs/<norm>_<partition>_s<seed>/ (ordinary fedkn run directories). Cells already finished
in OUT are skipped, and an unfinished one resumes from its last finished round, so rerunning an
interrupted command continues the sweep. Order: seed by seed, so a stopped sweep has whole seeds.

Tuning (--lr-grid). Before the grid, each norm (on each partition, or on the --tune-on
partition only) runs every lr of the grid once, on --tune-seed with --tune-rounds rounds, into
OUT/tune/. Each is scored by the mean accuracy of its global models over its last {window:g}% of
rounds (the final model alone when that is one round; under label skew a single round's model
swings by points) on a validation split carved from the clients' training data, never the test
set; every seed of the grid then runs at the chosen lr. A norm's runs scored earlier keep their
window (runs scored on the final model alone are never mixed with windowed ones).
A choice at the lowest or highest lr tried extends the grid by one more lr beyond that edge (the
grid's own log spacing) and chooses again, up to {max_extensions} times (the report flags a choice still at
an edge). If a norm's best validation accuracy is below {chance_factor:g}x chance (1 / classes), the tuning runs
were too short to tell the lrs apart: the command stops, saying to raise --tune-rounds (tuning
runs of another length are run again from scratch).

The report. OUT/report.md: per partition and norm (mean +/- std over seeds), the headline
accuracy (the mean of the centralized test accuracy over the evaluations in the last 10% of
rounds; clients' accuracy for fedbn), its gain over the last 20% of rounds (cells still gaining
more than 1 point flagged), final and best test accuracy, rounds and seconds to --target accuracy,
clients' federated test accuracy, wall time per round, parameters and MB sent per round; the
paired difference of kn minus every other norm (same seeds) with 95% t-intervals; the tuning
table (every lr's validation score, the chosen lr, flags) with the tuning runs' length and cost.
Also OUT/final_metrics.csv (one row per run), accuracy_test.png / accuracy_clients.png (per
round) and accuracy_test_seconds.png / accuracy_clients_seconds.png (per wall-clock second), one
panel per partition, one line per norm, and tuning.png. `fedkn report OUT` rebuilds all of it.
"""

EPILOG = """\
examples:
  fedkn compare --norms kn,gn --partitions iid --seeds 2 --set num-rounds=2 --out runs/quick
  fedkn compare --config configs/compare-digits.toml --out benchmarks/results/digits \\
      --lr-grid log:0.01:0.16:5 --tune-rounds 6 --tune-on dir0.1
  # re-run one cell of that comparison alone (reproduces its metrics.csv on the same kind of CPU):
  fedkn compare <the same options> --only norm=kn,partition=dir0.1,seed=0 --out /tmp/rerun

GPU machines: clients share a GPU through the config values client-num-gpus and client-num-cpus
(the Ray resources of one client), e.g. four clients at a time on one GPU:
  fedkn compare --set client-num-gpus=0.25 --set client-num-cpus=2 ...
(a preset file can hold them too: client-num-gpus = 0.25).

partition specs: iid, dir<alpha> (Dirichlet label skew, e.g. dir0.1), shards<k> / <k>cls (k classes
per client), quantity:alpha=<a>, classes-balance:... (see `fedkn partition --help`).
norms: kn, gn, ln, bn, fedbn (bn with the FedBN strategy), fixbn (bn with FixBN: statistics frozen after
fixbn-round), nf (normalization-free, FedWon: scaled WS convolutions + AGC), none, wsgn.
"""


#: The default grid.
DEFAULT_NORMS: tuple[str, ...] = ("kn", "gn", "ln", "bn", "fedbn", "fixbn", "nf", "none")
DEFAULT_PARTITIONS: tuple[str, ...] = ("iid", "dir1.0", "dir0.3", "dir0.1", "shards2")
DEFAULT_SEEDS = 3


def register(subparsers: Any) -> None:
    from fedkn.compare.report import DEFAULT_TARGET
    from fedkn.compare.tuning import (
        DEFAULT_VAL_FRACTION,
        MAX_EXTENSIONS,
        NEAR_CHANCE_FACTOR,
        SCORE_WINDOW,
    )

    p = subparsers.add_parser(
        "compare",
        help="run a grid of norms x partitions x seeds (optionally lr-tuned) and write a comparison report",
        description=DESCRIPTION.format(max_extensions=MAX_EXTENSIONS, chance_factor=NEAR_CHANCE_FACTOR, window=100 * SCORE_WINDOW),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("the grid")
    g.add_argument("--norms", default=",".join(DEFAULT_NORMS), metavar="LIST",
                   help=f"comma list of norms (default: {','.join(DEFAULT_NORMS)})")
    g.add_argument("--partitions", default=",".join(DEFAULT_PARTITIONS), metavar="LIST",
                   help=f"comma list of partition specs (default: {','.join(DEFAULT_PARTITIONS)})")
    g.add_argument("--seeds", default=str(DEFAULT_SEEDS), metavar="N|LIST",
                   help=f"a count N (seeds 0..N-1) or a comma list of seeds (default: {DEFAULT_SEEDS})")
    g.add_argument("--only", action="append", default=[], metavar="KEY=V,...",
                   help="run only the matching cells, e.g. norm=kn,partition=dir0.1,seed=0 (keys norm, partition, "
                        "seed; repeatable, a cell matching any is run); it must match a cell of the grid")
    b = p.add_argument_group("the base run config (identical in every cell)")
    b.add_argument("--config", metavar="FILE", help="preset TOML file, e.g. configs/compare-digits.toml")
    b.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable); norm, partition, seed, name and output-dir come from the grid")
    b.add_argument("--eval-every", dest="eval_every", action="append", default=[], metavar="PARTITION=K",
                   help="score the global test set every K rounds in that partition's cells instead of the base "
                        "eval-every (repeatable), e.g. dir0.1=1: under label skew one round's test accuracy swings by "
                        "points, so the headline window needs more evaluations. Only which rounds are scored changes, "
                        "never training; every norm of a partition shares it; tuning runs are scored on validation")
    t = p.add_argument_group("learning-rate tuning (on a validation split, never the test set)")
    t.add_argument("--lr-grid", metavar="LRS",
                   help="learning rates to try: a comma list (0.01,0.03,0.1) or log:LOW:HIGH:COUNT (log:0.005:0.2:5)")
    t.add_argument("--tune-rounds", type=int, metavar="N", help="rounds per tuning run (default: half of num-rounds)")
    t.add_argument("--tune-seed", type=int, metavar="S", help="seed of the tuning runs (default: the grid's first seed)")
    t.add_argument("--tune-on", default="all", metavar="all|PARTITION",
                   help="'all': tune each norm on each partition (default); a partition: tune each norm there and use its "
                        "lr on every partition")
    t.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help=f"share of each client's training data held out as the validation split that tuning runs "
                        f"are scored on (default: {DEFAULT_VAL_FRACTION:g}); 0 scores the clients' held-out local splits")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="runs/compare", metavar="DIR", help="output directory (default: runs/compare)")
    o.add_argument("--target", type=float, default=DEFAULT_TARGET, metavar="ACC",
                   help=f"accuracy for the 'rounds to target' column (default: {DEFAULT_TARGET})")
    o.add_argument("--force", action="store_true",
                   help="re-run the selected cells from scratch even if finished (tuning runs already scored are reused; "
                        "delete OUT/tune to re-tune)")
    o.add_argument("--dry-run", action="store_true", help="list the cells (and tuning runs) and exit")
    o.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    o.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                   help="start no further run (tuning or cell) after MINUTES; the run in progress finishes, the "
                        "report is written, and rerunning the same command continues (for sweeps run in chunks)"),
    p.set_defaults(func=compare_command)


def canonical_command(args: argparse.Namespace) -> str:
    """The grid's command line (without --only/--force/--dry-run): what the report records."""
    parts = ["fedkn", "compare"]
    if args.config:
        parts += ["--config", args.config]
    for s in args.sets:
        parts += ["--set", s]
    for e in args.eval_every:
        parts += ["--eval-every", e]
    parts += ["--norms", args.norms, "--partitions", args.partitions, "--seeds", str(args.seeds)]
    if args.lr_grid:
        parts += ["--lr-grid", args.lr_grid]
        if args.tune_rounds is not None:
            parts += ["--tune-rounds", str(args.tune_rounds)]
        if args.tune_seed is not None:
            parts += ["--tune-seed", str(args.tune_seed)]
        if args.tune_on != "all":
            parts += ["--tune-on", args.tune_on]
        if args.val_fraction is not None:
            parts += ["--val-fraction", f"{args.val_fraction:g}"]
    parts += ["--target", f"{args.target:g}", "--out", args.out]
    return shlex.join(parts)


def _tune_spec(args: argparse.Namespace, base: RunConfig, partitions: list[str], seeds: list[int]) -> TuneSpec | None:
    """The --lr-grid step as a TuneSpec (None without --lr-grid), every tuning option checked."""
    from fedkn.compare.grid import canonical_partition
    from fedkn.compare.tuning import DEFAULT_VAL_FRACTION, TuneSpec, parse_lr_grid

    if args.lr_grid is not None:
        grid = parse_lr_grid(args.lr_grid)
        rounds = args.tune_rounds if args.tune_rounds is not None else max(1, base.federation.num_rounds // 2)
        if rounds < 1:
            raise FedknError(f"--tune-rounds must be at least 1, got {rounds}")
        tune_seed = args.tune_seed if args.tune_seed is not None else seeds[0]
        if tune_seed < 0:
            raise FedknError(f"--tune-seed must be 0 or more, got {tune_seed}")
        on = args.tune_on
        if on != "all":
            try:
                canon = canonical_partition(on)
            except FedknError as err:
                raise FedknError(f"--tune-on: {err}") from None
            on = next((p for p in partitions if canonical_partition(p) == canon), on)
        vf = args.val_fraction
        if vf is not None and not 0.0 <= vf < 1.0:
            raise FedknError(f"--val-fraction must be in [0, 1), got {vf:g}")
        return TuneSpec(tuple(grid), rounds, tune_seed, on, vf if vf is not None else DEFAULT_VAL_FRACTION)
    if any(x is not None for x in (args.tune_rounds, args.tune_seed, args.val_fraction)) or args.tune_on != "all":
        raise FedknError("--tune-rounds/--tune-seed/--tune-on/--val-fraction only apply with --lr-grid")
    return None


def _cell_jobs(base: RunConfig, cells: list[Any], spec: TuneSpec | None, lrs: dict[tuple[str, str], float],
               eval_every: dict[str, int], out: Path) -> list[tuple[str, Any, RunConfig, Path]]:
    """The grid's run jobs, each cell at its tuned lr (the base lr without tuning) and its partition's
    evaluation cadence (``--eval-every``)."""
    from fedkn.compare.grid import RUNS_DIR, cell_config

    jobs = []
    for c in cells:
        if spec is not None:
            c = type(c)(c.norm, c.partition, c.seed, lrs[(c.norm, spec.group_partition(c.partition))])
        jobs.append(("cell", c, cell_config(base, c, partition_eval_every=eval_every, output_dir=out / RUNS_DIR), out / RUNS_DIR / c.name))
    return jobs


def compare_command(args: argparse.Namespace) -> int:
    from fedkn.compare.grid import (
        RUNS_DIR,
        cell_config,
        expand_grid,
        fmt_duration,
        parse_eval_every,
        parse_norms,
        parse_partitions,
        parse_seeds,
        select,
    )
    from fedkn.compare.report import build_report, write_meta
    from fedkn.config import RunConfig

    # --- everything is checked before anything runs -------------------------------------------------
    base = RunConfig.from_sources(args.config, None, args.sets)
    norms = parse_norms(args.norms)
    partitions = parse_partitions(args.partitions)
    seeds = parse_seeds(args.seeds)
    eval_every = parse_eval_every(args.eval_every, partitions)
    if not 0.0 < args.target <= 1.0:
        raise FedknError(f"--target must be an accuracy in (0, 1], got {args.target:g}")
    if args.stop_after is not None and not args.stop_after > 0:
        raise FedknError(f"--stop-after must be a positive number of minutes, got {args.stop_after:g}")
    cells = expand_grid(norms, partitions, seeds)
    selected = select(cells, args.only)
    out = Path(args.out)
    for c in cells:  # every cell's config must be valid (e.g. batch-size 1 with bn)
        cell_config(base, c, partition_eval_every=eval_every)

    spec = _tune_spec(args, base, partitions, seeds)
    groups = list(dict.fromkeys((c.norm, spec.group_partition(c.partition)) for c in selected)) if spec else []
    print(
        f"fedkn compare: {len(norms)} norms x {len(partitions)} partitions x {len(seeds)} seeds = {len(cells)} cells"
        + (f", running {len(selected)} (--only)" if args.only else "")
        + (f"; lr tuning: {len(groups)} groups x {len(spec.grid)} lrs" if spec else "")
        + f"; {base.model.name} x{base.model.width:g}, {base.data.dataset}, {base.data.num_clients} clients, {base.federation.num_rounds} rounds",
        flush=True,
    )
    print(f"output: {out}", flush=True)
    if args.dry_run:
        for norm, part in groups:
            print(f"  tune {norm} on {part}: lr {', '.join(f'{v:g}' for v in spec.grid)} ({spec.rounds} rounds, seed {spec.seed}; "
                  "more lrs if the choice is at an edge)")
        for c in selected:
            every = f" (eval-every {eval_every[c.partition]})" if c.partition in eval_every else ""
            print(f"  cell {c.label()}{every} -> {out / RUNS_DIR / c.name}")
        return 0

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedknError(f"cannot create '{out}': {err.strerror or err}") from None
    write_meta(out, {
        "command": canonical_command(args), "norms": norms, "partitions": partitions, "seeds": seeds, "target": args.target,
        "base_config": base.to_flower(), "eval_every": eval_every,
        "tuning": None if spec is None else {"grid": list(spec.grid), "rounds": spec.rounds, "seed": spec.seed, "on": spec.on},
    })

    t0 = time.perf_counter()
    results = _run(args, base, selected, spec, groups, eval_every, out)
    if results is None:
        return 0
    report = build_report(out)
    ran = sum(1 for _, _, s in results if s == "ran")
    print(f"done: {ran} cells run, {len(results) - ran} already finished, in {fmt_duration(time.perf_counter() - t0)}")
    _print_table(out)
    print(f"report: {report}")
    return 0


def _run(args: argparse.Namespace, base: Any, selected: list[Any], spec: TuneSpec | None, groups: list[tuple[str, str]],
         eval_every: dict[str, int], out: Path) -> list[tuple[Any, Path, str]] | None:
    """Tune (scored runs are reused), then run the cells; None when --stop-after stopped it."""
    from fedkn.compare.grid import Deadline, TimeBudgetSpent, run_cells

    deadline = Deadline(args.stop_after) if args.stop_after is not None else None
    try:
        lrs: dict[tuple[str, str], float] = {}
        if spec is not None:
            from fedkn.compare.tuning import tune

            choices = tune(base, groups, spec, out, verbose=args.verbose, deadline=deadline)
            lrs = {k: c.lr for k, c in choices.items()}
        return run_cells(_cell_jobs(base, selected, spec, lrs, eval_every, out), force=args.force, verbose=args.verbose,
                         deadline=deadline)
    except TimeBudgetSpent as stop:
        print(f"fedkn compare: stopped: {stop}; rerun the same command to continue (finished runs are kept)", flush=True)
        _try_report(out)
        return None
    except KeyboardInterrupt:
        print("fedkn compare: interrupted; rerun the same command to continue (finished cells are kept)", file=sys.stderr)
        _try_report(out)
        raise


def _try_report(out: Path) -> None:
    from fedkn.compare.report import build_report

    with contextlib.suppress(Exception):  # best effort on the way out
        build_report(out)


def _print_table(out: Path) -> None:
    """The headline accuracy per partition and norm (and the clients'), from final_metrics.csv."""
    import csv

    from fedkn.compare.report import HEADLINE_SHARE, TIDY_FILE, mean_std, pct_ms

    try:
        with open(out / TIDY_FILE, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r["status"] == "finished"]
    except OSError:
        return
    parts = list(dict.fromkeys(r["partition"] for r in rows))
    if rows:
        print(f"headline accuracy (mean of the last {100 * HEADLINE_SHARE:.0f}% of the rounds' evaluations; clients' for fedbn):")
    for p in parts:
        norms = list(dict.fromkeys(r["norm"] for r in rows if r["partition"] == p))
        cells = []
        for n in norms:
            mine = [r for r in rows if r["partition"] == p and r["norm"] == n]
            head = mean_std(float(r["headline_accuracy"]) for r in mine)
            fed = mean_std(float(r["headline_fed_eval_accuracy"]) for r in mine)
            cells.append(f"{n} {pct_ms(head)} (clients {pct_ms(fed)})")
        print(f"  {p}: " + " | ".join(cells))
