"""Simulation overhead: fedkn on Flower + Ray against a plain sequential PyTorch loop, in one run.

Both sides do the same federated work from the same :class:`~fedkn.config.RunConfig`:

- **fedkn**: the in-process simulation ``fedkn run`` uses (``make_server_app`` + ``simulate``:
  Flower's simulation engine, Ray actors running fedkn's ClientApp), results in a scratch run dir;
- **plain loop**: one Python process, no Flower, no Ray: per round the same seeded sample of
  clients (``fedkn.sampling``), for each the same ``fedkn.train.train_local`` with the same
  per-client seed, one model object reused for every client, the FedAvg example-weighted average,
  and the same centralized ``fedkn.train.evaluate`` on the global test set. With
  ``--fraction-evaluate`` > 0 both also run federated evaluation on the sampled clients' test splits.

fedkn's per-round times are metrics.csv's ``round_time_s``; the loop's are timed the same way (from
the end of one round's evaluation to the end of the next). Round 1 is the warm-up round (Ray
actors build the federation and model on their first training message) and is shown apart; the
target is on the steady rounds 2..R. Startup (Ray, actors, node discovery, round-0 evaluation for
fedkn; data and model for the loop) and teardown are reported separately. Repeats alternate the
order (loop, fedkn, fedkn, loop, ...) so background load hits both alike. Target (issue 5):
fedkn's steady time per round <= 1.15x the loop's at 100 clients x 10% sampling.

    python benchmarks/simulation_overhead.py                  # 100 clients, 10% sampled, 6 rounds, 3 repeats
    python benchmarks/simulation_overhead.py --quick          # smoke run: 4 clients, 2 rounds, 1 repeat
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

TARGET = 1.15
GIB = 2**30

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@dataclass
class RunTiming:
    """One run of either side."""

    side: str  # "fedkn" | "loop"
    startup_s: float  # until the round-0 evaluation is done
    round_s: list[float]  # rounds 1..R
    teardown_s: float  # after the last round until the call returned
    wall_s: float
    final_test_loss: float = float("nan")
    final_test_accuracy: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steady_s(self) -> float:
        rounds = self.round_s[1:] or self.round_s
        return statistics.mean(rounds)


def base_config(args: argparse.Namespace, **changes: Any) -> Any:
    from fedkn.config import RunConfig

    values = {
        "dataset": "digits",
        "model": args.model,
        "norm": args.norm,
        "width": args.width,
        "num_clients": args.clients,
        "partition": args.partition,
        "fraction_train": args.fraction,
        "fraction_evaluate": args.fraction_evaluate,
        "local_steps": args.local_steps,
        "batch_size": args.batch,
        "num_rounds": args.rounds,
        "client_num_cpus": args.client_num_cpus,
        "seed": 0,
        "name": "bench",
    }
    values.update(changes)
    return RunConfig.of(**values)


# --------------------------------------------------------------------------------------------------
# process-tree memory from /proc (no psutil needed)
# --------------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2 :].split()  # the name may hold spaces and parentheses
    return int(rest[1]), int(rest[19])


def process_tree(root: int) -> dict[int, int]:
    """pid -> start time of ``root`` and all its descendants."""
    parent: dict[int, int] = {}
    start: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parent[int(entry)], start[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in start and pid not in out:
            out[pid] = start[pid]
            todo.extend(children.get(pid, ()))
    return out


def _kib_field(path: str, name: str) -> int:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return "?"
    first = args[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first
    for a in args:  # python scripts: show the script, not the interpreter
        s = a.decode(errors="replace")
        if s.endswith(".py"):
            return os.path.basename(s)
    return os.path.basename(first) or "?"


@dataclass
class MemoryPeak:
    rss: int = 0
    pss: int = 0
    processes: int = 0
    breakdown: list[tuple[str, int]] = field(default_factory=list)  # (name, rss) at the RSS peak
    seen: dict[int, int] = field(default_factory=dict)  # pid -> start time of every process sampled
    samples: int = 0


class TreeSampler:
    """Samples this process and its descendants in a background thread: which processes (always)
    and their memory (with ``memory``; reading smaps costs a little CPU)."""

    def __init__(self, interval: float, *, memory: bool = True) -> None:
        self.interval = interval
        self.memory = memory
        self.peak = MemoryPeak()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def sample(self) -> None:
        with self._lock:
            self._sample()

    def _sample(self) -> None:
        tree = process_tree(os.getpid())
        self.peak.seen.update(tree)
        if not self.memory:
            return
        rss = {pid: _kib_field(f"/proc/{pid}/status", "VmRSS:") for pid in tree}
        pss = sum(_kib_field(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in tree)
        total = sum(rss.values())
        p = self.peak
        p.samples += 1
        p.pss = max(p.pss, pss)
        if total > p.rss:
            p.rss, p.processes = total, len(tree)
            p.breakdown = sorted(((_name(pid), r) for pid, r in rss.items()), key=lambda t: -t[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_for_exit(seen: dict[int, int], timeout: float = 20.0) -> list[int]:
    """Wait for every process this run started to exit (Ray's workers linger a few seconds after
    ``ray.shutdown``); what is still there after ``timeout`` gets SIGTERM, then SIGKILL, by pid
    (checked against its start time, so a reused pid is never touched). Returns the pids stopped."""
    me = os.getpid()
    mine = {pid: st for pid, st in seen.items() if pid != me}

    def alive() -> list[int]:
        out = []
        for pid, st in mine.items():
            cur = _stat(pid)
            if cur is not None and cur[1] == st and not _is_zombie(pid):
                out.append(pid)
        return out

    def wait(seconds: float) -> list[int]:
        deadline = time.monotonic() + seconds
        while (left := alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    stopped = wait(timeout)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in wait(0.0 if sig == signal.SIGTERM else 2.0):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    return stopped


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
        return data[data.rfind(")") + 2 :].split()[0] == "Z"
    except OSError:
        return True


# --------------------------------------------------------------------------------------------------
# fedkn: exactly what `fedkn run` does, with a progress callback that timestamps each round
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_stopped_after() -> Iterator[None]:
    """Make sure no Ray instance outlives the block (Flower shuts Ray down itself on success)."""
    try:
        yield
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def run_fedkn(
    cfg: Any,
    out_root: Path,
    *,
    verbose: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    sample_interval: float = 1.0,
    memory: bool = False,
    exit_timeout: float = 20.0,
) -> RunTiming:
    """``cfg`` through fedkn's in-process Flower simulation; timings from metrics.csv.

    A :class:`TreeSampler` follows the processes the run starts (and their memory with
    ``memory``); after the run they are waited for, so no Ray process outlives the call.
    ``extra`` holds ``run_dir``, ``peak`` (:class:`MemoryPeak`) and ``killed``: pids still alive
    ``exit_timeout`` seconds after the run, then stopped (Ray workers exit on their own within
    seconds of ``ray.shutdown``; a short timeout only saves waiting)."""
    from concurrent.futures import Future

    import pandas as pd

    from fedkn.app import client_app
    from fedkn.app.server_app import make_server_app
    from fedkn.app.simulation import simulate
    from fedkn.results import RunDir

    run_dir = RunDir.create(cfg, root=out_root)
    marks: dict[int, float] = {}

    sampler = TreeSampler(sample_interval, memory=memory)

    def progress(row: dict[str, Any], _cfg: Any) -> None:
        marks[int(row["round"])] = time.perf_counter()
        sampler.sample()  # every process of the run is alive now
        if on_round is not None:
            on_round(row)

    result: Future = Future()
    server_app = make_server_app(cfg, run_dir, progress=progress, result=result)
    try:
        with sampler, ray_stopped_after():
            t0 = time.perf_counter()
            simulate(
                server_app,
                client_app.app,
                num_clients=cfg.data.num_clients,
                num_cpus=cfg.run.client_num_cpus,
                num_gpus=cfg.run.client_num_gpus,
                log_file=run_dir.path / "flower.log",
                verbose=verbose,
            )
            t_end = time.perf_counter()
    finally:
        killed = wait_for_exit(sampler.peak.seen, exit_timeout)
    if not result.done():
        raise RuntimeError(f"fedkn run did not finish (see {run_dir.path})")
    if result.exception() is not None:
        raise RuntimeError(f"fedkn run failed: {result.exception()}")
    if not result.result().finished:
        raise RuntimeError(f"fedkn run did not finish: {result.result().status} (see {run_dir.path})")
    df = pd.read_csv(run_dir.metrics_path)
    rounds = df[df["round"] >= 1]
    last = df.iloc[-1]
    return RunTiming(
        side="fedkn",
        startup_s=marks[0] - t0,
        round_s=[float(v) for v in rounds["round_time_s"]],
        teardown_s=t_end - marks[max(marks)],
        wall_s=t_end - t0,
        final_test_loss=float(last["test_loss"]),
        final_test_accuracy=float(last["test_accuracy"]),
        extra={"run_dir": str(run_dir.path), "peak": sampler.peak, "killed": killed},
    )


# --------------------------------------------------------------------------------------------------
# the plain loop: same sampling, same train_local/evaluate, FedAvg average, no Flower, no Ray
# --------------------------------------------------------------------------------------------------


def clear_process_caches() -> None:
    """Forget cached datasets/federations/models, so the loop's startup is not flattered by the
    driver's earlier fedkn run (which built them in this process)."""
    from fedkn.cache import WORKER_CACHE

    WORKER_CACHE.clear("federations", "datasets", "models")


def fedavg(states: list[dict[str, Any]], weights: list[float]) -> dict[str, Any]:
    """Example-weighted average, computed like Flower's ``aggregate_arrayrecords`` (numpy, in order)."""
    import numpy as np
    import torch

    total = float(sum(weights))
    out: dict[str, np.ndarray] = {}
    for state, w in zip(states, weights, strict=True):
        f = w / total
        for k, v in state.items():
            if k in out:
                out[k] += v * f
            else:
                out[k] = v * f
    return {k: torch.from_numpy(np.asarray(v)) for k, v in out.items()}


def run_loop(cfg: Any, threads: int | None = None) -> RunTiming:
    """The same federated workload as a plain sequential loop in this process, with ``threads``
    torch threads (None: leave torch's setting); the process's setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_loop(cfg)
    finally:
        torch.set_num_threads(before)


def _run_loop(cfg: Any) -> RunTiming:
    import torch

    from fedkn.app import task
    from fedkn.sampling import sample_partitions, sample_size
    from fedkn.train import default_device, evaluate, train_local

    clear_process_caches()
    t0 = time.perf_counter()
    fed = task.federation(cfg)
    device = default_device()
    global_model = task.new_model(cfg, fed.train_set)
    client_model = task.new_model(cfg, fed.train_set)  # one object reused for every client
    eval_model = task.new_model(cfg, fed.train_set)
    train_pre = task.preprocess(cfg, fed.train_set, train=True)
    local_pre = task.preprocess(cfg, fed.train_set, train=False)
    test_pre = task.preprocess(cfg, fed.test_set, train=False)
    global_state = {k: v.detach().cpu().clone() for k, v in global_model.state_dict().items()}

    def centralized(state: dict[str, torch.Tensor]) -> tuple[float, float]:
        task.load_weights(eval_model, state)
        res = evaluate(eval_model, fed.test_set, None, cfg.train.eval_batch_size, device, test_pre)
        return res.loss, res.accuracy

    loss, acc = centralized(global_state)
    t_last = time.perf_counter()
    startup = t_last - t0
    n_train = sample_size(cfg.data.num_clients, cfg.federation.fraction_train)
    n_eval = sample_size(cfg.data.num_clients, cfg.federation.fraction_evaluate)
    rounds: list[float] = []
    for r in range(1, cfg.federation.num_rounds + 1):
        states, weights = [], []
        for pid in sample_partitions(cfg.data.num_clients, n_train, seed=cfg.run.seed, server_round=r, phase="train"):
            task.load_weights(client_model, global_state)
            seed = task.client_seed(cfg, r, pid)
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            res = train_local(
                client_model,
                fed.train_set,
                fed.client(pid).train,
                batch_size=cfg.train.batch_size,
                lr=cfg.train.lr,
                momentum=cfg.train.momentum,
                weight_decay=cfg.train.weight_decay,
                epochs=cfg.train.local_epochs,
                steps=cfg.train.local_steps or None,
                generator=generator,
                device=device,
                preprocess=train_pre,
            )
            if res.num_examples > 0:
                states.append({k: v.detach().cpu().numpy().copy() for k, v in client_model.state_dict().items()})
                weights.append(float(res.num_examples))
        if states:
            global_state = fedavg(states, weights)
        if n_eval:  # federated evaluation of the new global model on the sampled clients' test splits
            for pid in sample_partitions(cfg.data.num_clients, n_eval, seed=cfg.run.seed, server_round=r, phase="evaluate"):
                task.load_weights(client_model, global_state)
                evaluate(client_model, fed.train_set, fed.client(pid).test, cfg.train.eval_batch_size, device, local_pre)
        loss, acc = centralized(global_state)
        now = time.perf_counter()
        rounds.append(now - t_last)
        t_last = now
    t_end = time.perf_counter()
    return RunTiming(
        side="loop",
        startup_s=startup,
        round_s=rounds,
        teardown_s=t_end - t_last,
        wall_s=t_end - t0,
        final_test_loss=float(loss),
        final_test_accuracy=float(acc),
    )


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _fmt_rounds(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100, help="number of virtual clients (default 100)")
    parser.add_argument("--fraction", type=float, default=0.1, help="fraction-train: share sampled per round (default 0.1)")
    parser.add_argument("--fraction-evaluate", type=float, default=0.0,
                        help="federated evaluation share per round, in both sides (default 0: centralized only)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run (default 6; round 1 is warm-up)")
    parser.add_argument("--local-steps", type=int, default=5, help="SGD steps per client per round (default 5)")
    parser.add_argument("--batch", type=int, default=8, help="local batch size (default 8)")
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--norm", default="kn")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--client-num-cpus", type=float, default=1.0, help="Ray CPUs per ClientApp actor (default 1)")
    parser.add_argument("--loop-threads", type=int, default=1,
                        help="torch threads of the plain loop (default 1, what each Ray actor gets with client-num-cpus 1; "
                        "0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, order alternating (default 3)")
    parser.add_argument("--out", default=None, help="keep fedkn's run directories here (default: a temp dir, removed)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 clients, 2 sampled, 2 rounds, 1 local step, 1 repeat (checks it runs; times mean little)")
    args = parser.parse_args(argv)
    exit_timeout = 20.0
    if args.quick:
        args.clients, args.fraction, args.rounds, args.local_steps, args.repeats = 4, 0.5, 2, 1, 1
        exit_timeout = 2.0

    import torch

    cfg = base_config(args)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedkn-bench-overhead-"))
    print(
        f"workload: {cfg.model.name} x{cfg.model.width:g} {cfg.model.norm}, {cfg.data.dataset}, {cfg.data.num_clients} clients ({cfg.data.partition}), "
        f"fraction-train {cfg.federation.fraction_train:g}, fraction-evaluate {cfg.federation.fraction_evaluate:g}, {cfg.federation.num_rounds} rounds, "
        f"{cfg.train.local_steps} local steps x batch {cfg.train.batch_size}; client-num-cpus {cfg.run.client_num_cpus:g}"
    )
    loop_threads = args.loop_threads or torch.get_num_threads()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch threads: loop {loop_threads}, "
          f"fedkn driver {torch.get_num_threads()}, Ray actors 1 per client-num-cpus; repeats {args.repeats} (order alternates)")
    sides = ["loop", "fedkn"]
    runs: list[RunTiming] = []
    try:
        for i in range(args.repeats):
            order = sides if i % 2 == 0 else sides[::-1]
            for side in order:
                if side == "loop":
                    t = run_loop(cfg, args.loop_threads or None)
                else:
                    t = run_fedkn(cfg, out, verbose=args.verbose, exit_timeout=exit_timeout)
                    t.side = side
                runs.append(t)
                print(f"  repeat {i + 1} {side:11}: startup {t.startup_s:6.2f}s  rounds [{_fmt_rounds(t.round_s)}]s  "
                      f"teardown {t.teardown_s:5.2f}s  final test acc {100 * t.final_test_accuracy:5.1f}% "
                      f"loss {t.final_test_loss:.4f}", flush=True)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)

    def agg(side: str, fn: Callable[[RunTiming], float]) -> float:
        return statistics.median(fn(r) for r in runs if r.side == side)

    rows = [
        ("startup (s)", lambda r: r.startup_s),
        ("round 1, warm-up (s)", lambda r: r.round_s[0]),
        ("time per round, rounds 2..R (s)", lambda r: r.steady_s),
        ("teardown (s)", lambda r: r.teardown_s),
        ("wall (s)", lambda r: r.wall_s),
    ]
    print()
    fedkn_sides = sides[1:]
    header = f"{'median over repeats':34} {'plain loop':>11}" + "".join(f" {n:>11} {n + '/loop':>17}" for n in fedkn_sides)
    print(header)
    print("-" * len(header))
    for label, fn in rows:
        lo = agg("loop", fn)
        line = f"{label:34} {lo:11.3f}"
        for n in fedkn_sides:
            fe = agg(n, fn)
            line += f" {fe:11.3f} " + (f"{fe / lo:17.2f}" if lo > 0.01 else f"{'n/a':>17}")
        print(line)
    print("-" * len(header))

    def steady_ratios(side: str) -> list[float]:
        loops = [r for r in runs if r.side == "loop"]
        return [f.steady_s / lo.steady_s for lo, f in zip(loops, [r for r in runs if r.side == side])]

    same = all(abs(r.final_test_loss - runs[0].final_test_loss) < 1e-3 for r in runs)
    print(f"same work check: final test loss equal on every run (|diff| < 1e-3): {'yes' if same else 'NO'}")
    for n in fedkn_sides:
        print(f"per-repeat ratio {n}/loop (steady round): {' '.join(f'{x:.2f}' for x in steady_ratios(n))}")
    ratio = agg("fedkn", lambda r: r.steady_s) / agg("loop", lambda r: r.steady_s)
    print(f"ratio fedkn/loop time per round = {ratio:.2f}")
    print(f"target: fedkn time per round <= {TARGET}x plain loop -> {'met' if ratio <= TARGET else 'NOT met'}")
    killed = [pid for r in runs for pid in r.extra.get("killed", [])]
    print(f"processes left after the fedkn runs: {'none' if not killed else f'{len(killed)} (stopped by pid: {killed})'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
