"""Scale: many virtual clients, few sampled per round; peak memory of the whole process tree.

Runs fedkn's in-process simulation (what ``fedkn run`` does) with 1000 virtual clients, 10 of them
sampled per round for training (and for federated evaluation), then the same with 100 clients, and
reports the peak resident memory of the benchmark process plus everything it started (Ray's GCS,
raylet, agents, the ClientApp actors), sampled from /proc every ``--interval`` seconds:

- **sum RSS**: the sum of every process's VmRSS (counts pages shared between processes, such as
  the torch libraries every Ray worker maps, once per process: an upper bound);
- **sum PSS**: the sum of proportional set sizes (shared pages split among their users: what the
  tree really occupies).

Targets (issue 5): peak sum RSS at 1000 clients < 4 GiB, and flat in the number of clients (no
per-client model or optimizer kept between rounds): peak(1000) / peak(100) <= 1.10. Time per round
(rounds 2..R) and startup (Ray, actors, asking all clients for their partition) are shown too.

    python benchmarks/scale.py                 # 1000 and 100 clients, 10 per round, 5 rounds
    python benchmarks/scale.py --quick         # smoke run: 8 and 4 clients, 2 per round, 2 rounds
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulation_overhead import GIB, MemoryPeak, run_fedkn

RSS_TARGET = 4 * GIB
FLAT_TARGET = 1.10


# --------------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------------


@dataclass
class ScaleResult:
    clients: int
    peak: MemoryPeak
    startup_s: float
    steady_s: float
    rounds: list[float]
    clients_trained: list[int]
    killed: list[int]


def run_one(args: argparse.Namespace, clients: int, out: Path) -> ScaleResult:
    import pandas as pd

    from fedkn.config import RunConfig

    fraction = (args.per_round + 0.5) / clients  # Flower samples int(clients * fraction) = per_round
    cfg = RunConfig.of(
        dataset="digits",
        model=args.model,
        norm=args.norm,
        width=args.width,
        num_clients=clients,
        partition="iid",
        fraction_train=fraction,
        fraction_evaluate=fraction if args.fed_eval else 0.0,
        local_steps=args.local_steps,
        batch_size=args.batch,
        num_rounds=args.rounds,
        client_num_cpus=args.client_num_cpus,
        round_timeout=600.0,
        name=f"scale-{clients}",
    )
    timing = run_fedkn(cfg, out, verbose=args.verbose, sample_interval=args.interval, memory=True,
                       exit_timeout=2.0 if args.quick else 20.0)
    df = pd.read_csv(Path(timing.extra["run_dir"]) / "metrics.csv")
    return ScaleResult(
        clients=clients,
        peak=timing.extra["peak"],
        startup_s=timing.startup_s,
        steady_s=timing.steady_s,
        rounds=timing.round_s,
        clients_trained=[int(v) for v in df[df["round"] >= 1]["clients_trained"]],
        killed=timing.extra["killed"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1000,100", help="client counts, first is the target one (default 1000,100)")
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled per round (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (default 5)")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--norm", default="kn")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--client-num-cpus", type=float, default=1.0)
    parser.add_argument("--no-fed-eval", dest="fed_eval", action="store_false",
                        help="no federated evaluation (default: per-round clients also evaluate)")
    parser.add_argument("--interval", type=float, default=0.25, help="memory sampling interval in s (default 0.25)")
    parser.add_argument("--out", default=None, help="keep the run directories here (default: a temp dir, removed)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 8 and 4 clients, 2 per round, 2 rounds, 1 local step (checks it runs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.per_round, args.rounds, args.local_steps = "8,4", 2, 2, 1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    counts = [int(c) for c in args.clients.split(",")]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedkn-bench-scale-"))
    print(f"workload: {args.model} x{args.width:g} {args.norm}, digits iid, {args.per_round} clients per round, "
          f"{args.rounds} rounds, {args.local_steps} local steps x batch {args.batch}, fed eval {'on' if args.fed_eval else 'off'}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    results: list[ScaleResult] = []
    try:
        for n in counts:
            r = run_one(args, n, out)
            results.append(r)
            print(f"  {n} clients: rounds [{' '.join(f'{x:.2f}' for x in r.rounds)}]s, clients trained per round "
                  f"{sorted(set(r.clients_trained))}, {r.peak.samples} memory samples, peak over {r.peak.processes} processes: "
                  + ", ".join(f"{name} {rss / 2**20:.0f}" for name, rss in r.peak.breakdown[:6]) + " MiB ...", flush=True)
            if r.killed:
                print(f"  note: {len(r.killed)} process(es) still alive after the run were stopped: {r.killed}")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)

    header = f"{'clients':>8} {'peak sum RSS GiB':>17} {'peak sum PSS GiB':>17} {'processes':>9} {'startup s':>10} {'s/round':>8}"
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.clients:8d} {r.peak.rss / GIB:17.2f} {r.peak.pss / GIB:17.2f} {r.peak.processes:9d} "
              f"{r.startup_s:10.2f} {r.steady_s:8.2f}")
    print("-" * len(header))
    big = results[0]
    ok_rss = big.peak.rss < RSS_TARGET
    print(f"peak sum RSS at {big.clients} clients = {big.peak.rss / GIB:.2f} GiB (PSS {big.peak.pss / GIB:.2f} GiB)")
    print(f"target: peak RSS < {RSS_TARGET / GIB:.0f} GiB -> {'met' if ok_rss else 'NOT met'}")
    if len(results) > 1:
        small = results[-1]
        rss_ratio = big.peak.rss / small.peak.rss
        pss_ratio = big.peak.pss / small.peak.pss
        time_ratio = big.steady_s / small.steady_s
        print(f"ratio peak RSS {big.clients}/{small.clients} clients = {rss_ratio:.2f} (PSS {pss_ratio:.2f}); "
              f"time per round ratio = {time_ratio:.2f}; startup ratio = {big.startup_s / small.startup_s:.2f}")
        print(f"target: flat memory, RSS ratio <= {FLAT_TARGET:.2f} -> {'met' if rss_ratio <= FLAT_TARGET else 'NOT met'}")
    leftovers = sum(len(r.killed) for r in results)
    print(f"processes left after the runs: {'none' if not leftovers else f'{leftovers} (stopped by pid)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
