"""Learning-rate tuning for ``fedkn compare --lr-grid``: never on the test set.

For each tuning group (a norm on one partition) every lr of a small grid is run once, on one seed
and a shortened round budget, into ``<out>/tune/<norm>_<partition>_lr<lr>_s<seed>/``. The global
models of each run's last rounds (:data:`SCORE_WINDOW` of its rounds, ``keep-models``) are scored
on a **validation split carved from the clients' training data** (:func:`validation_score`), and
the group's lr is the one with the best mean validation accuracy (ties: lower validation loss,
then the smaller lr). The mean, not the final model alone: under label skew the global model's
accuracy swings by several points from one round to the next (Fashion-MNIST, Dirichlet 0.1:
4.5 points per 4 rounds around round 50), more than the gaps between neighbouring lrs. A group
keeps the window its first scored runs had, so runs scored on the final model alone (tuning
before the window existed) are never mixed with windowed ones.

Two guards make the choice trustworthy (:func:`search`, :func:`check_above_chance`):

- **A choice at an edge extends the grid.** When the best lr is the lowest (highest) one tried,
  one more lr beyond that edge is run and scored, a factor :func:`grid_step` away (the grid's own
  log spacing, ``(max / min) ** (1 / (count - 1))``; 2 for a one-value grid), and the choice is
  made again, until it is no longer at an edge or :data:`MAX_EXTENSIONS` lrs were added; a choice
  still at an edge then is flagged (``Choice.capped``), as is one whose next lr is not scored yet.
  A diverged lr counts as tried, so a best lr just below a diverged one is not at an edge.
- **No lr is chosen from scores near chance.** If a group's best validation accuracy is below
  :data:`NEAR_CHANCE_FACTOR` x chance (chance = 1 / number of classes), the runs are too short to
  tell the lrs apart: tuning stops with one line saying to lengthen them (``--tune-rounds``)
  before any grid cell runs. (Reports of tuning scored before this check mark such groups
  unusable instead.)

A tuning run is reused only when it was planned with the same number of rounds; one of another
length is deleted and run again from scratch (its eval schedule differs, so it cannot resume).

Which validation split: when the run config carries ``val-fraction > 0`` (``fedkn compare`` sets
``--val-fraction``, default 0.1, in every tuning run; those samples never reach training), the
union of the clients' ``val`` splits. Without it, the union of the clients' held-out local splits (``test-fraction`` of each
client's share): carved from the clients' training data and never trained on, but the same split
that the tuning run's federated evaluation reports. Either way the global test set, which the
report's test-accuracy columns use, is never looked at during tuning.

Under FedBN each client's split is scored with the global model plus that client's own BatchNorm
state (``client_state/``), exactly as the federated evaluation does.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedkn.config import RunConfig
from fedkn.errors import DivergedError, FedknError
from fedkn.summary import RunSummary

if TYPE_CHECKING:  # for the annotation only; tune() imports grid where it runs
    from fedkn.compare.grid import Deadline

SCORE_FILE = "val_score.json"
DEFAULT_VAL_FRACTION = 0.1
#: Most lrs added beyond an edge of the grid per tuning group before the choice is flagged instead.
MAX_EXTENSIONS = 4
#: A best validation accuracy below this multiple of chance (1 / classes) chooses nothing.
NEAR_CHANCE_FACTOR = 1.5
#: Share of a tuning run's rounds, the last ones, whose global models are scored and averaged.
SCORE_WINDOW = 0.2


# --------------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------------


def parse_lr_grid(text: str) -> list[float]:
    """``"0.01,0.03,0.1"`` or ``"log:1e-3:1e-1:5"`` (5 log-spaced values) -> sorted distinct lrs > 0."""
    text = text.strip()
    if text.startswith("log:"):
        parts = text[4:].split(":")
        if len(parts) != 3:
            raise FedknError(f"--lr-grid log form is log:LOW:HIGH:COUNT, e.g. log:1e-3:1e-1:5, got '{text}'")
        try:
            low, high, count = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError:
            raise FedknError(f"--lr-grid log form is log:LOW:HIGH:COUNT with numbers, got '{text}'") from None
        if not (low > 0 and high > 0 and math.isfinite(low) and math.isfinite(high)):
            raise FedknError(f"--lr-grid values must be positive learning rates, got '{text}'")
        if count < 2 or high <= low:
            raise FedknError(f"--lr-grid log:LOW:HIGH:COUNT needs LOW < HIGH and COUNT >= 2, got '{text}'")
        values = [float(f"{v:.3g}") for v in np.geomspace(low, high, count)]
    else:
        values = []
        for item in [x.strip() for x in text.split(",")]:
            if not item:
                continue
            try:
                v = float(item)
            except ValueError:
                raise FedknError(f"--lr-grid value '{item}' is not a number (in '{text}')") from None
            if not (v > 0 and math.isfinite(v)):
                raise FedknError(f"--lr-grid values must be positive learning rates, got {item} (in '{text}')")
            values.append(v)
    if not values:
        raise FedknError("--lr-grid needs at least one learning rate, e.g. 0.01,0.03,0.1 or log:1e-3:1e-1:5")
    if len(set(values)) != len(values):
        raise FedknError(f"--lr-grid lists a learning rate twice: '{text}'")
    return sorted(values)


@dataclass(frozen=True)
class TunePoint:
    norm: str
    partition: str
    lr: float
    seed: int
    status: str  # "ok" | "diverged"
    val_accuracy: float
    val_loss: float
    val_examples: int
    val_source: str
    run: str  # the tuning run's directory name
    error: str = ""
    val_models: int = 1  # global models averaged, those of the run's last rounds (1: the final one)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TunePoint:
        def num(v: Any) -> float:
            return math.nan if v is None else float(v)

        return cls(
            norm=str(d["norm"]),
            partition=str(d["partition"]),
            lr=float(d["lr"]),
            seed=int(d["seed"]),
            status=str(d["status"]),
            val_accuracy=num(d.get("val_accuracy")),
            val_loss=num(d.get("val_loss")),
            val_examples=int(d.get("val_examples") or 0),
            val_source=str(d.get("val_source", "")),
            run=str(d.get("run", "")),
            error=str(d.get("error", "")),
            val_models=int(d.get("val_models") or 1),  # scores from before the window: the final model
        )


@dataclass(frozen=True)
class Choice:
    norm: str
    partition: str
    points: tuple[TunePoint, ...]  # sorted by lr
    lr: float
    edge: str  # "" | "low" | "high"
    extended: tuple[float, ...] = ()  # lrs added beyond the grid's edges, in the order they were run
    capped: bool = False  # still at an edge after the most extensions search() was allowed

    @property
    def at_edge(self) -> bool:
        return bool(self.edge)

    @property
    def best(self) -> TunePoint:
        return next(p for p in self.points if p.lr == self.lr)


def choose(points: Sequence[TunePoint]) -> Choice:
    """The lr with the best validation accuracy (ties: lower loss, then smaller lr); flags edges.

    A choice at the lowest or highest lr tried (diverged ones count as tried) is flagged
    ``low`` / ``high``.
    """
    if not points:
        raise FedknError("no tuning runs to choose a learning rate from")
    pts = sorted(points, key=lambda p: p.lr)
    ok = [p for p in pts if p.status == "ok" and math.isfinite(p.val_accuracy)]
    if not ok:
        raise FedknError(
            f"every lr of the grid failed for norm {pts[0].norm} on {pts[0].partition} "
            f"({pts[0].error or pts[0].status}); try smaller learning rates"
        )
    best = min(ok, key=lambda p: (-p.val_accuracy, p.val_loss if math.isfinite(p.val_loss) else math.inf, p.lr))
    edge = ""
    if best.lr <= pts[0].lr:
        edge = "low"
    elif best.lr >= pts[-1].lr:
        edge = "high"
    return Choice(norm=pts[0].norm, partition=pts[0].partition, points=tuple(pts), lr=best.lr, edge=edge)


def grid_step(grid: Sequence[float]) -> float:
    """The factor between an edge of the grid and the lr that extends it: the grid's mean log spacing."""
    if len(grid) < 2:
        return 2.0
    return float((max(grid) / min(grid)) ** (1.0 / (len(grid) - 1)))


def search(
    grid: Sequence[float],
    score: Callable[[float], TunePoint | None],
    *,
    step: float | None = None,
    max_extensions: int = MAX_EXTENSIONS,
) -> Choice:
    """Choose among ``grid``'s lrs, extending the grid past the edge the choice sits at.

    ``score(lr)`` returns the lr's scored point, or None where there is none (then that lr is left
    out; an extension stops there). ``step`` defaults to :func:`grid_step` of ``grid``. The
    extended lrs are rounded to 3 significant digits, as ``log:`` grids are.
    """
    factor = step if step is not None else grid_step(grid)
    points = [p for lr in grid if (p := score(lr)) is not None]
    choice = choose(points)
    extended: list[float] = []
    while choice.at_edge and len(extended) < max_extensions:
        tried = [p.lr for p in choice.points]
        lr = float(f"{(tried[0] / factor if choice.edge == 'low' else tried[-1] * factor):.3g}")
        if any(math.isclose(lr, v, rel_tol=1e-9) for v in tried):
            break  # a step too fine for 3 digits: nothing new to try
        point = score(lr)
        if point is None:
            break
        extended.append(lr)
        points.append(point)
        choice = choose(points)
    return replace(choice, extended=tuple(extended), capped=choice.at_edge and len(extended) >= max_extensions)


def chance_level(cfg: RunConfig) -> float:
    """Accuracy of guessing: 1 / the number of classes of ``cfg``'s dataset."""
    from fedkn.data import load_dataset

    return 1.0 / load_dataset(cfg.data.dataset, "test", cfg.data.data_dir or None).num_classes


def near_chance(choice: Choice, chance: float) -> bool:
    """Whether the group's best validation accuracy is too close to chance to choose from."""
    return choice.best.val_accuracy < NEAR_CHANCE_FACTOR * chance


def check_above_chance(choices: dict[tuple[str, str], Choice], chance: float, rounds: int) -> None:
    """Stop (one line) when any group's best validation score is near chance."""
    bad = [c for c in choices.values() if near_chance(c, chance)]
    if bad:
        which = "; ".join(f"{c.norm} on {c.partition} {100 * c.best.val_accuracy:.1f}% at lr {c.lr:g}" for c in bad)
        raise FedknError(
            f"tuning: best validation accuracy below {NEAR_CHANCE_FACTOR:g}x chance ({100 * NEAR_CHANCE_FACTOR * chance:.1f}%) "
            f"for {which}: the lrs cannot be told apart; lengthen the tuning runs (--tune-rounds, now {rounds})"
        )


# --------------------------------------------------------------------------------------------------
# scoring on the validation split
# --------------------------------------------------------------------------------------------------


def validation_indices(cfg: RunConfig) -> tuple[Any, list[np.ndarray], str]:
    """(federation, per-client validation indices into its train set, source description)."""
    from fedkn.app import task

    fed = task.federation(cfg)
    if any(len(c.val) for c in fed.clients):
        return fed, [c.val for c in fed.clients], "clients' val splits"
    return fed, [c.test for c in fed.clients], "clients' held-out local splits"


@dataclass(frozen=True)
class ValScore:
    accuracy: float
    loss: float
    examples: int
    source: str
    models: int  # global models averaged


def validation_score(path: str | Path) -> ValScore:
    """A run's score on the validation split: the mean over the global models it kept
    (``keep-models``: its last rounds), or its final global model when it kept none.

    Every model is scored on the same samples, so the mean accuracy is the accuracy of the pooled
    predictions. Under FedBN each client's split is scored with that client's BatchNorm state as of
    the model's round.
    """
    import torch

    from fedkn.app import task
    from fedkn.local_state import local_keys, with_local
    from fedkn.results import Checkpoint, RunDir, load_checkpoint, load_client_state
    from fedkn.train import default_device, evaluate

    run = RunDir.open(path)
    cfg = run.read_config()
    if snapshots := run.kept_models():
        checkpoints = [load_checkpoint(f) for f in snapshots]
    elif (ckpt := run.load_checkpoint()) is not None:
        checkpoints = [ckpt]
    else:
        raise FedknError(f"'{path}' has no checkpoint to score (model.pt)")
    fed, parts, source = validation_indices(cfg)
    if not any(len(p) for p in parts):
        raise FedknError(f"the clients of '{path}' hold no validation samples; raise val-fraction or test-fraction")
    model = task.new_model(cfg, fed.train_set)
    kept = local_keys(cfg.federation, model)
    initial = model.state_dict()  # a client never trained keeps the initial local state
    fresh = {k: initial[k].clone() for k in kept}
    pre = task.preprocess(cfg, fed.train_set, train=False)
    device = default_device()
    pooled = np.sort(np.concatenate([np.asarray(p) for p in parts]))

    def score(ckpt: Checkpoint) -> tuple[float, float, int]:
        """(accuracy, loss, examples) of one global model."""
        if not kept:
            task.load_weights(model, dict(ckpt.model))
            r = evaluate(model, fed.train_set, pooled, cfg.train.eval_batch_size, device, pre)
            return r.accuracy, r.loss, r.num_examples
        loss_sum, correct, n = 0.0, 0.0, 0
        with torch.no_grad():
            for pid, idx in enumerate(parts):
                if len(idx) == 0:
                    continue
                local = load_client_state(run.client_state_dir, pid, ckpt.round) or fresh
                task.load_weights(model, with_local(dict(ckpt.model), local, kept))
                r = evaluate(model, fed.train_set, idx, cfg.train.eval_batch_size, device, pre)
                loss_sum += r.loss * r.num_examples
                correct += r.accuracy * r.num_examples
                n += r.num_examples
        return correct / n, loss_sum / n, n

    scores = [score(c) for c in checkpoints]
    return ValScore(float(np.mean([a for a, _, _ in scores])), float(np.mean([loss for _, loss, _ in scores])),
                    scores[0][2], source, len(scores))


def write_point(path: Path, point: TunePoint) -> None:
    (path / SCORE_FILE).write_text(json.dumps(point.to_json(), indent=2) + "\n", encoding="utf-8")


def read_point(path: Path) -> TunePoint | None:
    f = path / SCORE_FILE
    if not f.is_file():
        return None
    try:
        return TunePoint.from_json(json.loads(f.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError):
        return None


def load_points(tune_dir: Path) -> list[TunePoint]:
    """Every scored tuning run under ``tune_dir``."""
    if not tune_dir.is_dir():
        return []
    return [p for d in sorted(tune_dir.iterdir()) if d.is_dir() and (p := read_point(d)) is not None]


def planned_rounds(path: Path) -> int | None:
    """The rounds a tuning run was planned with (its config), None if ``path`` holds no run."""
    from fedkn.results import CONFIG_FILE, RunDir

    return RunDir(path).read_config().federation.num_rounds if (path / CONFIG_FILE).is_file() else None


def run_seconds(path: Path) -> float:
    """Wall seconds a run took (its last ``elapsed_s``, which adds up over resumes); nan if unknown."""
    v = RunSummary.read(path).elapsed_s
    return float(v) if isinstance(v, (int, float)) else math.nan


# --------------------------------------------------------------------------------------------------
# the tuning step
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneSpec:
    grid: tuple[float, ...]
    rounds: int
    seed: int
    on: str  # "all": tune each (norm, partition); else a partition every norm is tuned on
    val_fraction: float = DEFAULT_VAL_FRACTION
    max_extensions: int = MAX_EXTENSIONS  # lrs :func:`search` may add past an edge per group (0: flag only)
    score_models: int = 0  # global models (the last rounds') each run's score averages; 0: SCORE_WINDOW of rounds

    @property
    def models_scored(self) -> int:
        return self.score_models or max(1, round(SCORE_WINDOW * self.rounds))

    def group_partition(self, partition: str) -> str:
        """The partition whose tuning decides the lr of cells on ``partition``."""
        return partition if self.on == "all" else self.on


def tune(
    base: RunConfig,
    groups: Sequence[tuple[str, str]],
    spec: TuneSpec,
    out: Path,
    *,
    force: bool = False,
    verbose: bool = False,
    deadline: Deadline | None = None,
) -> dict[tuple[str, str], Choice]:
    """Run and score the grid for each ``(norm, partition)`` group, extending it past an edge
    the choice sits at (:func:`search`); the choice per group. Stops (one line) if a group's best
    score is near chance (:func:`check_above_chance`), before any grid cell runs. No tuning run
    starts after ``deadline``."""
    from fedkn.compare.grid import TUNE_DIR, Cell, cell_config, run_cells

    tune_root = out / TUNE_DIR
    # Tuning runs are scored on the validation split after their last round, so the test set is
    # evaluated only at round 0 and the end (its accuracy plays no part in the choice).
    extra: dict[str, Any] = {"num_rounds": spec.rounds, "eval_every": spec.rounds}
    if spec.val_fraction > 0:
        extra["val_fraction"] = spec.val_fraction

    # A group's runs average as many models as its runs scored earlier at this length did.
    models = {} if force else {(p.norm, p.partition): p.val_models for p in load_points(tune_root)
                               if p.seed == spec.seed and planned_rounds(tune_root / p.run) == spec.rounds}

    def job(norm: str, partition: str, lr: float) -> tuple[str, Cell, RunConfig, Path] | None:
        """The tuning run of one lr, or None when it is scored already at this length."""
        cell = Cell(norm, partition, spec.seed, lr)
        window = models.setdefault((norm, partition), spec.models_scored)
        cfg = cell_config(base, cell, name=cell.tune_name(), output_dir=tune_root,
                          keep_models=window if window > 1 else 0, **extra)
        path = tune_root / cell.tune_name()
        rounds = planned_rounds(path)
        if rounds is not None and rounds != spec.rounds:
            print(f"tuning: {path.name} was planned with {rounds} rounds, not {spec.rounds}: running it again", flush=True)
            shutil.rmtree(path)
        elif not force and (point := read_point(path)) is not None and point.lr == lr:
            return None  # scored earlier (a diverged run is recorded as such and not re-run)
        return ("tune", cell, cfg, path)

    def on_done(cell: Cell, cfg: RunConfig, path: Path, summary: RunSummary | None, err: BaseException | None) -> None:
        if err is not None:
            point = TunePoint(cell.norm, cell.partition, float(cell.lr or cfg.train.lr), cell.seed, "diverged",
                              math.nan, math.nan, 0, "", path.name, str(getattr(err, "reason", err)),
                              val_models=max(1, cfg.federation.keep_models))  # the group's window, for its later runs
        else:
            v = validation_score(path)
            point = TunePoint(cell.norm, cell.partition, float(cell.lr or cfg.train.lr), cell.seed, "ok",
                              v.accuracy, v.loss, v.examples, v.source, path.name, val_models=v.models)
            which = f"mean of the last {v.models} rounds' models" if v.models > 1 else "final model"
            print(f"      validation ({v.source}, {which}): accuracy {100 * v.accuracy:.1f}%, loss {v.loss:.3f}", flush=True)
        write_point(path, point)

    def run(jobs: Sequence[tuple[str, Cell, RunConfig, Path]]) -> None:
        run_cells(jobs, force=force, verbose=verbose, quiet_rounds=True, on_done=on_done,
                  catch=lambda e: isinstance(e, DivergedError), show_scores=False, deadline=deadline)

    jobs = [j for norm, partition in groups for lr in spec.grid if (j := job(norm, partition, lr)) is not None]
    if jobs:
        print(f"tuning: {len(jobs)} runs (lr grid {', '.join(f'{v:g}' for v in spec.grid)}; "
              f"{spec.rounds} rounds, seed {spec.seed})", flush=True)
        run(jobs)

    choices: dict[tuple[str, str], Choice] = {}
    for norm, partition in groups:
        def score(lr: float, norm: str = norm, partition: str = partition) -> TunePoint | None:
            if lr not in spec.grid and (j := job(norm, partition, lr)) is not None:
                print(f"tuning: {norm} on {partition}: best lr at an edge of the lrs tried, extending to {lr:g}", flush=True)
                run([j])
            return read_point(tune_root / Cell(norm, partition, spec.seed, lr).tune_name())

        choice = search(spec.grid, score, max_extensions=spec.max_extensions)
        choices[(norm, partition)] = choice
        flag = f"  (still at the {choice.edge} edge after {len(choice.extended)} extensions)" if choice.edge else ""
        scores = ", ".join(f"{p.lr:g}: {'diverged' if p.status != 'ok' else f'{100 * p.val_accuracy:.1f}%'}" for p in choice.points)
        print(f"tuned {norm} on {partition}: lr {choice.lr:g}{flag}  [{scores}]", flush=True)
    if choices:
        check_above_chance(choices, chance_level(base), spec.rounds)
    return choices
