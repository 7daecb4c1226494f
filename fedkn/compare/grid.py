"""The comparison grid: cells, the ``--only`` filter, cell directories, skipping finished cells.

A **cell** is one federated run: ``(norm, partition, seed)`` plus the learning rate it runs at.
Every cell of a seed shares the partition (fixed by the seed), the model initialization (fixed by
the seed, per norm: ``fedkn.app.task.new_model`` seeds torch with the run seed before building),
the client sampling (``fedkn.sampling``: seeded by run seed and round only) and the local
shuffling (seeded by run seed, round and partition id), so norms differ only in the norm.

Cells live in ``<out>/runs/<norm>_<partition>_s<seed>/`` (a normal fedkn run directory). A cell is
*finished* when its ``summary.json`` says ``finished`` with all rounds done; an unfinished one is
resumed from its checkpoint by the server app, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkn.config import RULE_NORMS, RunConfig
from fedkn.errors import FedknError
from fedkn.summary import RunSummary

RUNS_DIR = "runs"
TUNE_DIR = "tune"
#: Config keys that may differ between a cell directory's saved config and the wanted one.
IGNORED_KEYS: frozenset[str] = frozenset({"name", "output-dir", "num-rounds", "round-timeout", "client-num-cpus", "client-num-gpus"})
ONLY_KEYS: tuple[str, ...] = ("norm", "partition", "seed")


@dataclass(frozen=True)
class Cell:
    """One run of the grid. ``norm`` is the grid's label: a ``RULE_NORMS`` name (FedBN's, FixBN's) stays that name here."""

    norm: str
    partition: str
    seed: int
    lr: float | None = None  # None: the base config's lr (or the tuned one, filled in later)

    @property
    def name(self) -> str:
        return f"{self.norm}_{slug(self.partition)}_s{self.seed}"

    def tune_name(self) -> str:
        """Directory name of a tuning run (the lr is part of it)."""
        return f"{self.norm}_{slug(self.partition)}_lr{format_lr(self.lr)}_s{self.seed}"

    def label(self) -> str:
        lr = f" lr {format_lr(self.lr)}" if self.lr is not None else ""
        return f"{self.norm} {self.partition} seed {self.seed}{lr}"

    def only_spec(self) -> str:
        return f"norm={self.norm},partition={self.partition},seed={self.seed}"


def slug(text: str) -> str:
    """A directory-safe token: ``classes-balance:balance=0.5`` -> ``classes-balance-balance-0.5``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def format_lr(lr: float | None) -> str:
    return "base" if lr is None else f"{lr:g}"


# --------------------------------------------------------------------------------------------------
# grid expansion and --only
# --------------------------------------------------------------------------------------------------


def canonical_partition(spec: str) -> str:
    """``dir0.1`` and ``dirichlet:alpha=0.1`` compare equal through this."""
    from fedkn.data import format_partition, parse_partition, resolve_params

    scheme, params = parse_partition(spec)
    return format_partition(scheme, resolve_params(scheme, params))


def split_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise FedknError(f"{what} must list at least one value, got '{text}'")
    return items


def parse_norms(text: str | Sequence[str]) -> list[str]:
    from fedkn.nn.norms import check_norm_name

    items = split_list(text, "--norms") if isinstance(text, str) else list(text)
    for n in items:
        check_norm_name(n, also=tuple(RULE_NORMS), where=" in --norms")
    if len(set(items)) != len(items):
        raise FedknError(f"--norms lists a norm twice: {','.join(items)}")
    return items


def parse_partitions(text: str | Sequence[str]) -> list[str]:
    items = split_list(text, "--partitions") if isinstance(text, str) else list(text)
    seen: dict[str, str] = {}
    for p in items:
        try:
            canon = canonical_partition(p)
        except FedknError as err:
            raise FedknError(f"--partitions: {err}") from None
        if canon in seen:
            raise FedknError(f"--partitions lists the same partition twice: '{seen[canon]}' and '{p}'")
        seen[canon] = p
    return items


def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """``"3"`` -> seeds 0, 1, 2; ``"0,4,7"`` -> those seeds."""
    if isinstance(text, int):
        text = str(text)
    if not isinstance(text, str):
        return [int(s) for s in text]
    items = split_list(text, "--seeds")
    try:
        values = [int(x) for x in items]
    except ValueError:
        raise FedknError(f"--seeds must be a count (3) or a comma list of seeds (0,1,2), got '{text}'") from None
    if len(values) == 1:
        if values[0] < 1:
            raise FedknError(f"--seeds needs at least 1 seed, got '{text}'")
        return list(range(values[0]))
    if any(v < 0 for v in values) or len(set(values)) != len(values):
        raise FedknError(f"--seeds must list distinct non-negative seeds, got '{text}'")
    return values


def parse_eval_every(specs: Sequence[str], partitions: Sequence[str]) -> dict[str, int]:
    """``--eval-every dir0.1=1`` (repeatable) -> {grid partition: k}, the partitions whose cells score
    the global test set every k rounds instead of the base config's ``eval-every``.

    Keyed by the partition as ``--partitions`` spells it (``dirichlet:alpha=0.1=1`` names ``dir0.1``
    too). Only the evaluation cadence differs: it changes which rounds are scored, not training.
    """
    by_canon = {canonical_partition(p): p for p in partitions}
    out: dict[str, int] = {}
    for spec in specs:
        part, eq, value = spec.strip().rpartition("=")
        if not eq or not part.strip():
            raise FedknError(f"--eval-every expects PARTITION=K (e.g. dir0.1=1), got '{spec}'; "
                             "for every partition use --set eval-every=K")
        try:
            k = int(value)
        except ValueError:
            raise FedknError(f"--eval-every {spec}: K must be a whole number of rounds, got '{value}'") from None
        if k < 1:
            raise FedknError(f"--eval-every {spec}: K must be at least 1")
        try:
            canon = canonical_partition(part)
        except FedknError as err:
            raise FedknError(f"--eval-every {spec}: {err}") from None
        if canon not in by_canon:
            raise FedknError(f"--eval-every {spec}: '{part.strip()}' is not one of --partitions ({','.join(partitions)})")
        if by_canon[canon] in out:
            raise FedknError(f"--eval-every names partition '{by_canon[canon]}' twice")
        out[by_canon[canon]] = k
    return out


def expand_grid(norms: Sequence[str], partitions: Sequence[str], seeds: Sequence[int]) -> list[Cell]:
    """All cells, seed-major (a stopped sweep has whole seeds done), then partition, then norm."""
    return [Cell(n, p, s) for s in seeds for p in partitions for n in norms]


def parse_only(spec: str) -> dict[str, str]:
    """``norm=kn,partition=dir0.1,seed=0`` -> {"norm": "kn", ...}; every key at most once."""
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise FedknError(f"--only expects key=value pairs like norm=kn,partition=dir0.1,seed=0, got '{spec}'")
        if key not in ONLY_KEYS:
            raise FedknError(f"--only key '{key}' is not one of {', '.join(ONLY_KEYS)} (in '{spec}')")
        if key in out:
            raise FedknError(f"--only names '{key}' twice in '{spec}'")
        out[key] = value
    if not out:
        raise FedknError("--only expects key=value pairs like norm=kn,partition=dir0.1,seed=0, got an empty value")
    if "seed" in out:
        try:
            int(out["seed"])
        except ValueError:
            raise FedknError(f"--only seed must be an integer, got '{out['seed']}'") from None
    if "partition" in out:
        try:
            out["partition"] = canonical_partition(out["partition"])
        except FedknError as err:
            raise FedknError(f"--only partition: {err}") from None
    return out


def _matches(cell: Cell, flt: dict[str, str]) -> bool:
    if "norm" in flt and cell.norm != flt["norm"]:
        return False
    if "seed" in flt and cell.seed != int(flt["seed"]):
        return False
    return not ("partition" in flt and canonical_partition(cell.partition) != flt["partition"])


def select(cells: Sequence[Cell], only: Sequence[str]) -> list[Cell]:
    """The cells matching any of the ``--only`` specs (all cells when none is given)."""
    if not only:
        return list(cells)
    filters = [parse_only(s) for s in only]
    for spec, flt in zip(only, filters):
        if not any(_matches(c, flt) for c in cells):
            norms = ",".join(dict.fromkeys(c.norm for c in cells))
            parts = ",".join(dict.fromkeys(c.partition for c in cells))
            seeds = ",".join(str(s) for s in dict.fromkeys(c.seed for c in cells))
            raise FedknError(f"--only '{spec}' matches no cell of the grid (norms {norms}; partitions {parts}; seeds {seeds})")
    return [c for c in cells if any(_matches(c, f) for f in filters)]


# --------------------------------------------------------------------------------------------------
# cell configs and directories
# --------------------------------------------------------------------------------------------------


def cell_config(base: RunConfig, cell: Cell, *, name: str | None = None, output_dir: Path | str | None = None,
                partition_eval_every: Mapping[str, int] | None = None, **changes: Any) -> RunConfig:
    """``base`` with the cell's norm, partition, seed (and lr), and its partition's test-set cadence
    from ``partition_eval_every`` (``--eval-every``) where that names it; everything else identical."""
    if partition_eval_every and cell.partition in partition_eval_every:
        changes["eval_every"] = partition_eval_every[cell.partition]
    values = base.to_flower()
    strategy = base.federation.strategy
    values.update(
        {
            "norm": cell.norm,
            "strategy": cell.norm if cell.norm in RULE_NORMS else (strategy if strategy not in RULE_NORMS else "fedavg"),
            "partition": cell.partition,
            "seed": cell.seed,
            "name": name or cell.name,
        }
    )
    if cell.lr is not None:
        values["lr"] = cell.lr
    if output_dir is not None:
        values["output-dir"] = str(output_dir)
    values.update({k.replace("_", "-"): v for k, v in changes.items()})
    return RunConfig.from_dict(values)


def norm_label(cfg: RunConfig) -> str:
    """The grid label of a run: the ``RULE_NORMS`` name of its layer norm + strategy (FedBN: bn + the FedBN strategy), else the norm."""
    return cfg.federation.strategy if cfg.federation.strategy in RULE_NORMS else cfg.model.norm


def _differences(saved: RunConfig, wanted: RunConfig) -> list[str]:
    a, b = saved.to_flower(), wanted.to_flower()
    return [f"{k} {a[k]!r} != {b[k]!r}" for k in a if k not in IGNORED_KEYS and a[k] != b[k]]


def cell_state(path: Path, cfg: RunConfig) -> str:
    """``new`` (no directory), ``finished`` or ``partial``; a directory of another config is an error."""
    from fedkn.results import CONFIG_FILE, RunDir

    if not path.exists() or not (path / CONFIG_FILE).is_file():
        return "new"
    saved = RunDir(path).read_config()
    diff = _differences(saved, cfg)
    if diff:
        raise FedknError(
            f"'{path}' holds a run of another config ({'; '.join(diff[:3])}); "
            "use another --out, or --force to re-run it"
        )
    s = RunSummary.read(path)
    if s.finished and s.rounds_completed >= cfg.federation.num_rounds:
        return "finished"
    return "partial"


def prepare_dir(path: Path, cfg: RunConfig, *, force: bool = False) -> str:
    """Make ``path`` ready to run ``cfg``; returns its state before (``new``/``partial``/``finished``)."""
    from fedkn.results import RunDir

    if force and path.exists():
        shutil.rmtree(path)
    state = cell_state(path, cfg)
    if state == "new":
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FedknError(f"cannot create '{path}': {err.strerror or err}") from None
        RunDir(path).write_config(cfg)
    elif state == "partial":
        RunDir(path).write_config(cfg)  # resumable keys (rounds, resources) may have changed
    return state


# --------------------------------------------------------------------------------------------------
# running one cell
# --------------------------------------------------------------------------------------------------


def run_one(
    cfg: RunConfig,
    path: Path,
    *,
    progress: Callable[[dict[str, Any], RunConfig], None] | None = None,
    verbose: bool = False,
) -> RunSummary:
    """Run (or resume) ``cfg`` into the prepared run directory ``path``; returns its summary.

    The same steps as ``fedkn run`` (``fedkn.cli.run.run_command``), with a fixed directory:
    the server app resumes from ``model.pt`` when the directory has one. Several calls in one
    process are fine: each starts and stops its own Ray instance (about 10 s each).
    """
    from fedkn.app.runner import run_in_dir
    from fedkn.results import RunDir

    return run_in_dir(cfg, RunDir(path), progress=progress, verbose=verbose)


def indent_progress(prefix: str = "      ") -> Callable[[dict[str, Any], RunConfig], None]:
    from fedkn.app.server_app import format_progress

    def show(row: dict[str, Any], cfg: RunConfig) -> None:
        print(prefix + format_progress(row, cfg), flush=True)

    return show


class Eta:
    """Elapsed time and a remaining-time estimate from the cells run so far in this session."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.perf_counter()
        self.durations: list[float] = []

    def add(self, seconds: float) -> None:
        self.durations.append(seconds)

    def line(self, done: int) -> str:
        elapsed = time.perf_counter() - self.start
        left = self.total - done
        if self.durations and left > 0:
            eta = f", ETA {fmt_duration(left * sum(self.durations) / len(self.durations))}"
        else:
            eta = ""
        return f"elapsed {fmt_duration(elapsed)}{eta}"


class TimeBudgetSpent(Exception):
    """``--stop-after``'s time is up: no further run starts (finished ones are kept)."""


@dataclass(frozen=True)
class Deadline:
    """When a sweep chunk starts no further run: ``minutes`` after it began. A run started before
    that finishes, so a chunk ends whole and every run directory it leaves is finished."""

    minutes: float
    start: float = field(default_factory=time.monotonic)

    def check(self, left: int) -> None:
        """Raise :class:`TimeBudgetSpent` when the time is up (``left`` runs still to do)."""
        if time.monotonic() - self.start >= 60.0 * self.minutes:
            raise TimeBudgetSpent(f"--stop-after {self.minutes:g} minutes reached, {left} run(s) not started")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_cells(
    jobs: Iterable[tuple[str, Cell, RunConfig, Path]],
    *,
    force: bool = False,
    verbose: bool = False,
    quiet_rounds: bool = False,
    on_done: Callable[[Cell, RunConfig, Path, RunSummary | None, BaseException | None], None] | None = None,
    catch: Callable[[FedknError], bool] | None = None,
    show_scores: bool = True,
    deadline: Deadline | None = None,
) -> list[tuple[Cell, Path, str]]:
    """Run each ``(what, cell, cfg, path)`` job in order, skipping finished ones; prints progress.

    ``catch(err)`` may return True to record a failed job (``on_done`` gets the error) and go on.
    ``show_scores=False`` (tuning) prints no accuracies: the caller prints the validation score.
    ``deadline``: start no job once it has passed (:class:`TimeBudgetSpent`).
    Returns ``(cell, path, "skipped" | "ran" | "failed")`` per job.
    """
    jobs = list(jobs)
    # Check every directory first: a config mismatch fails before anything runs.
    states = ["new" if force else cell_state(path, cfg) for _, _, cfg, path in jobs]
    todo = sum(1 for s in states if s != "finished")
    eta = Eta(todo)
    done = 0
    out: list[tuple[Cell, Path, str]] = []
    for k, ((what, cell, cfg, path), state) in enumerate(zip(jobs, states), start=1):
        head = f"[{what} {k}/{len(jobs)}] {cell.label()}"
        if state == "finished":
            print(f"{head}: finished earlier, skipped ({path})", flush=True)
            out.append((cell, path, "skipped"))
            if on_done is not None:
                on_done(cell, cfg, path, RunSummary.read(path), None)
            continue
        if deadline is not None:
            deadline.check(todo - done)
        prepare_dir(path, cfg, force=force)
        print(f"{head}: {'resuming' if state == 'partial' else 'running'} -> {path}", flush=True)
        t0 = time.perf_counter()
        try:
            summary = run_one(cfg, path, progress=None if quiet_rounds else indent_progress(), verbose=verbose)
        except FedknError as err:
            if catch is not None and catch(err):
                done += 1
                eta.add(time.perf_counter() - t0)
                print(f"{head}: failed: {err}  |  {eta.line(done)}", flush=True)
                out.append((cell, path, "failed"))
                if on_done is not None:
                    on_done(cell, cfg, path, None, err)
                continue
            raise
        seconds = time.perf_counter() - t0
        done += 1
        eta.add(seconds)
        acc, fed = summary.final_test_accuracy, summary.final_fed_eval_accuracy
        acc_s = f"test acc {100 * acc:.1f}%" if _num(acc) else "test acc n/a"
        fed_s = f"clients acc {100 * fed:.1f}%" if _num(fed) else "clients acc n/a"
        scores = f": {acc_s}, {fed_s}" if show_scores else ""
        print(f"{head}: done in {fmt_duration(seconds)}{scores}  |  {eta.line(done)}", flush=True)
        out.append((cell, path, "ran"))
        if on_done is not None:
            on_done(cell, cfg, path, summary, None)
    return out
