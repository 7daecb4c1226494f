"""The comparison report: per-run figures, statistics over seeds, paired differences, markdown.

Everything here reads finished run directories (``<out>/runs/*``: config.toml, metrics.csv,
summary.json) and tuning scores (``<out>/tune/*/val_score.json``), so ``fedkn report DIR``
rebuilds the same report an interrupted or finished ``fedkn compare`` wrote.

Accuracy is the **centralized test accuracy** (the global model on the dataset's global test
set). FedBN has no global model worth testing (its BatchNorm layers stay on the clients), so its
centralized columns are empty; the "clients' test" columns (federated evaluation on the clients'
held-out local splits, every client with its own BatchNorm under FedBN) cover every norm.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedkn.errors import FedknError

REPORT_FILE = "report.md"
TIDY_FILE = "final_metrics.csv"
META_FILE = "compare.json"
DEFAULT_TARGET = 0.8
#: Reference norm of the paired differences.
REFERENCE_NORM = "kn"

TIDY_COLUMNS: tuple[str, ...] = (
    "norm",
    "partition",
    "seed",
    "lr",
    "dp_epsilon",
    "status",
    "rounds",
    "final_test_accuracy",
    "best_test_accuracy",
    "best_test_round",
    "final_test_loss",
    "rounds_to_target",
    "final_fed_eval_accuracy",
    "best_fed_eval_accuracy",
    "final_fed_eval_loss",
    "rounds_to_target_fed",
    "final_train_loss",
    "median_round_time_s",
    "elapsed_s",
    "model_parameters",
    "bytes_per_round",
    "run",
)


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------


def finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """(mean, sample std (ddof 1; nan for one value), n) over the finite values."""
    v = finite(values)
    if not v:
        return math.nan, math.nan, 0
    arr = np.asarray(v, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def rounds_to_target(rows: Sequence[Mapping[str, Any]], target: float, key: str = "test_accuracy") -> int | None:
    """The first round (>= 1) whose ``key`` reaches ``target``; None if no round does."""
    for r in rows:
        v = r.get(key)
        if int(r["round"]) >= 1 and v is not None and isinstance(v, (int, float)) and math.isfinite(v) and v >= target:
            return int(r["round"])
    return None


def t_interval(diffs: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n): the t-interval of the mean of paired differences (nan below n = 2)."""
    d = finite(diffs)
    n = len(d)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = float(np.mean(d))
    if n < 2:
        return m, math.nan, math.nan, n
    from scipy import stats

    se = float(np.std(d, ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    return m, m - half, m + half, n


# --------------------------------------------------------------------------------------------------
# loading runs
# --------------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    norm: str
    partition: str
    seed: int
    lr: float
    status: str
    rows: list[dict[str, float]]
    summary: dict[str, Any]
    path: Path
    num_rounds: int
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def _metric_rows(path: Path) -> list[dict[str, float]]:
    from fedkn.results import RunDir

    return RunDir(path).read_metrics()


def load_run(path: Path, target: float) -> RunRecord | None:
    """One run directory as a record with its final figures; None if it is not a run."""
    from fedkn.compare.grid import norm_label, read_summary
    from fedkn.results import CONFIG_FILE, RunDir

    if not (path / CONFIG_FILE).is_file():
        return None
    cfg = RunDir(path).read_config()
    rows = _metric_rows(path)
    summary = read_summary(path)
    status = str(summary.get("status", "missing"))
    if status == "finished" and int(summary.get("rounds_completed") or 0) < cfg.num_rounds:
        status = "partial"
    rec = RunRecord(norm_label(cfg), cfg.partition, cfg.seed, cfg.lr, status, rows, summary, path, cfg.num_rounds)
    trained = [r for r in rows if int(r["round"]) >= 1]
    last = rows[-1] if rows else {}

    def best(key: str) -> tuple[float, int | None]:
        vals = [(r[key], int(r["round"])) for r in trained if math.isfinite(r.get(key, math.nan))]
        if not vals:
            return math.nan, None
        v, rnd = max(vals, key=lambda t: (t[0], -t[1]))
        return v, rnd

    best_test, best_round = best("test_accuracy")
    best_fed, _ = best("fed_eval_accuracy")
    times = finite(r.get("round_time_s") for r in trained)  # median: round 1 also starts the client workers
    sent = [r.get("bytes_sent", 0) for r in trained]
    rec.figures = {
        "rounds": int(last.get("round", 0)),
        "final_test_accuracy": last.get("test_accuracy", math.nan),
        "best_test_accuracy": best_test,
        "best_test_round": best_round,
        "final_test_loss": last.get("test_loss", math.nan),
        "rounds_to_target": rounds_to_target(rows, target, "test_accuracy"),
        "final_fed_eval_accuracy": last.get("fed_eval_accuracy", math.nan),
        "best_fed_eval_accuracy": best_fed,
        "final_fed_eval_loss": last.get("fed_eval_loss", math.nan),
        "rounds_to_target_fed": rounds_to_target(rows, target, "fed_eval_accuracy"),
        "final_train_loss": last.get("train_loss", math.nan),
        "median_round_time_s": float(np.median(times)) if times else math.nan,
        "elapsed_s": last.get("elapsed_s", math.nan),
        "model_parameters": summary.get("model_parameters"),
        "bytes_per_round": float(np.mean(sent)) if sent else math.nan,
        # DP-SGD: the run's cumulative epsilon (max over clients); NaN for non-private runs.
        "dp_epsilon": float(summary["dp_epsilon"]) if summary.get("dp_epsilon") is not None else math.nan,
    }
    return rec


def load_runs(runs_dir: Path, target: float) -> list[RunRecord]:
    if not runs_dir.is_dir():
        return []
    out = []
    for d in sorted(runs_dir.iterdir()):
        if d.is_dir():
            rec = load_run(d, target)
            if rec is not None:
                out.append(rec)
    return out


def write_tidy(records: Sequence[RunRecord], path: Path, root: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(TIDY_COLUMNS)
        for r in records:
            fig = r.figures
            row = {
                "norm": r.norm,
                "partition": r.partition,
                "seed": r.seed,
                "lr": r.lr,
                "status": r.status,
                "run": os.path.relpath(r.path, root),
                **fig,
            }
            w.writerow([_csv(row.get(c)) for c in TIDY_COLUMNS])


def _csv(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


# --------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One (partition, norm) line of the main table."""

    norm: str
    partition: str
    seeds: list[int]
    lrs: list[float]
    final: tuple[float, float, int]
    best: tuple[float, float, int]
    to_target: list[int | None]
    fed_final: tuple[float, float, int]
    fed_best: tuple[float, float, int]
    fed_to_target: list[int | None]
    round_time: float
    params: int | None
    bytes_per_round: float
    #: Largest DP-SGD epsilon over the seeds (NaN: non-private).
    epsilon: float = math.nan


def aggregate(records: Sequence[RunRecord], norms: Sequence[str], partitions: Sequence[str]) -> list[Row]:
    out = []
    for p in partitions:
        for n in norms:
            mine = [r for r in records if r.norm == n and r.partition == p and r.finished]
            if not mine:
                continue
            mine.sort(key=lambda r: r.seed)
            f = [r.figures for r in mine]
            params = next((x["model_parameters"] for x in f if x["model_parameters"]), None)
            times = finite(x["median_round_time_s"] for x in f)
            sent = finite(x["bytes_per_round"] for x in f)
            out.append(
                Row(
                    norm=n,
                    partition=p,
                    seeds=[r.seed for r in mine],
                    lrs=sorted({r.lr for r in mine}),
                    final=mean_std(x["final_test_accuracy"] for x in f),
                    best=mean_std(x["best_test_accuracy"] for x in f),
                    to_target=[x["rounds_to_target"] for x in f],
                    fed_final=mean_std(x["final_fed_eval_accuracy"] for x in f),
                    fed_best=mean_std(x["best_fed_eval_accuracy"] for x in f),
                    fed_to_target=[x["rounds_to_target_fed"] for x in f],
                    round_time=float(np.mean(times)) if times else math.nan,
                    params=int(params) if params else None,
                    bytes_per_round=float(np.mean(sent)) if sent else math.nan,
                    epsilon=max(finite(x["dp_epsilon"] for x in f), default=math.nan),
                )
            )
    return out


@dataclass
class Paired:
    partition: str
    metric: str
    other: str  # the best other norm (highest mean of the metric among the other norms)
    seeds: list[int]
    diffs: list[float]
    mean: float
    low: float
    high: float


def paired_difference(
    records: Sequence[RunRecord], partition: str, metric: str, reference: str = REFERENCE_NORM
) -> Paired | None:
    """``reference`` minus the best other norm on ``metric`` (final figures), paired by seed.

    The best other norm is the one with the highest mean over the seeds both have; the interval
    is the 95% t-interval of the per-seed differences.
    """
    by_norm: dict[str, dict[int, float]] = {}
    for r in records:
        if r.partition != partition or not r.finished:
            continue
        v = r.figures.get(metric)
        if v is not None and math.isfinite(v):
            by_norm.setdefault(r.norm, {})[r.seed] = float(v)
    ref = by_norm.pop(reference, None)
    if not ref or not by_norm:
        return None
    best_other, best_mean = None, -math.inf
    for n, vals in sorted(by_norm.items()):
        common = sorted(set(vals) & set(ref))
        if not common:
            continue
        m = float(np.mean([vals[s] for s in common]))
        if m > best_mean:
            best_other, best_mean = n, m
    if best_other is None:
        return None
    seeds = sorted(set(by_norm[best_other]) & set(ref))
    diffs = [ref[s] - by_norm[best_other][s] for s in seeds]
    m, lo, hi, _ = t_interval(diffs)
    return Paired(partition, metric, best_other, seeds, diffs, m, lo, hi)


# --------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------


def pct_ms(ms: tuple[float, float, int]) -> str:
    m, s, n = ms
    if n == 0 or not math.isfinite(m):
        return "n/a"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if math.isfinite(s) else f"{100 * m:.1f}"


def fmt_target(values: Sequence[int | None]) -> str:
    hit = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if not hit:
        return f"never (0/{len(values)})"
    m = float(np.mean(hit))
    text = f"{m:.1f}" if len(hit) > 1 else f"{hit[0]}"
    return text if len(hit) == len(values) else f"{text} ({len(hit)}/{len(values)} seeds)"


def fmt_lr(lrs: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in lrs) if lrs else "n/a"


def fmt_bytes(b: float) -> str:
    return "n/a" if not math.isfinite(b) else f"{b / 1e6:.2f}"


def fmt_signed_pct(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{100 * v:+.1f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _ordering_notes(rows: Sequence[Row], partitions: Sequence[str]) -> list[str]:
    """Mechanical checks of the papers' expected ordering, from the means (see report text)."""
    notes = []

    def mean(p: str, n: str, fed: bool = False) -> float:
        for r in rows:
            if r.partition == p and r.norm == n:
                return (r.fed_final if fed else r.final)[0]
        return math.nan

    for p in partitions:
        ranked = sorted((r for r in rows if r.partition == p and math.isfinite(r.fed_final[0])), key=lambda r: -r.fed_final[0])
        central = sorted((r for r in rows if r.partition == p and math.isfinite(r.final[0])), key=lambda r: -r.final[0])
        if not central and not ranked:
            continue
        parts = []
        if central:
            parts.append("test acc: " + " > ".join(f"{r.norm} {100 * r.final[0]:.1f}" for r in central))
        if ranked:
            parts.append("clients' test acc: " + " > ".join(f"{r.norm} {100 * r.fed_final[0]:.1f}" for r in ranked))
        checks = []
        kn, gn, ln, none, bn = (mean(p, n) for n in ("kn", "gn", "ln", "none", "bn"))
        if all(math.isfinite(x) for x in (kn, gn, ln)):
            checks.append(f"KN >= GN/LN: {'yes' if kn >= max(gn, ln) else 'no'}")
        if all(math.isfinite(x) for x in (gn, ln, none)):
            checks.append(f"GN/LN > none: {'yes' if min(gn, ln) > none else 'no' if max(gn, ln) <= none else 'partly'}")
        if all(math.isfinite(x) for x in (kn, bn)):
            checks.append(f"BN below KN: {'yes' if bn < kn else 'no'}")
        notes.append(f"- **{p}**: " + "; ".join(parts) + (f". Checks (means): {', '.join(checks)}." if checks else "."))
    return notes


def norm_legend(norms: Sequence[str]) -> str:
    """``kn`` = what it is, for each grid label (registry norms and the ``RULE_NORMS`` training rules)."""
    from fedkn.config import RULE_NORMS
    from fedkn.nn.norms import NORMS

    def what(n: str) -> str:
        if n in RULE_NORMS:
            layer, rule = RULE_NORMS[n]
            return f"{layer} trained with the {n} rule, which {rule}"
        return NORMS[n].description if n in NORMS else "?"

    return "; ".join(f"`{n}` = {what(n)}" for n in norms)


def build_markdown(
    records: Sequence[RunRecord],
    *,
    meta: Mapping[str, Any],
    target: float,
    tuning: Mapping[str, Any] | None,
    plots: Sequence[str],
) -> str:
    norms = list(meta.get("norms") or dict.fromkeys(r.norm for r in records))
    partitions = list(meta.get("partitions") or dict.fromkeys(r.partition for r in records))
    for r in records:  # runs outside the recorded grid still show up
        if r.norm not in norms:
            norms.append(r.norm)
        if r.partition not in partitions:
            partitions.append(r.partition)
    rows = aggregate(records, norms, partitions)
    finished = [r for r in records if r.finished]
    unfinished = [r for r in records if not r.finished]
    base = meta.get("base_config") or (finished[0].summary.get("config") if finished else {}) or {}

    out: list[str] = ["# Normalization comparison", ""]
    if meta.get("command"):
        out += ["Produced by:", "", "```bash", str(meta["command"]), "```", ""]
    if base:
        keys = ("dataset", "model", "width", "num-clients", "num-rounds", "fraction-train", "fraction-evaluate",
                "batch-size", "local-epochs", "local-steps", "lr", "momentum", "weight-decay", "test-fraction",
                "eval-every")
        if meta.get("tuning"):
            keys = tuple(k for k in keys if k != "lr")  # per cell, tuned (see the tables)
        shown = ", ".join(f"{k} {base[k]}" for k in keys if k in base)
        out += [f"Setup: {shown}. Everything else is identical across cells; all cells of a seed share "
                "partition, initialization seed and client sampling.", ""]
    seeds = sorted({r.seed for r in finished})
    out += [
        f"Runs: {len(finished)} finished" + (f", {len(unfinished)} unfinished (not in the tables)" if unfinished else "")
        + f"; seeds {', '.join(map(str, seeds)) or 'none'}. Accuracies in %, mean ± std over seeds (sample std).",
        "",
        "- **test acc**: global model on the global test set (centralized), after the last round / best round. "
        "FedBN has no usable global model (BatchNorm stays on the clients): n/a.",
        "- **clients' test acc**: federated evaluation on the clients' held-out local splits "
        "(each client with its own BatchNorm under FedBN), after the last round.",
        f"- **rounds to {100 * target:.0f}%**: first round reaching the target, mean over the seeds that reached it"
        + (f" (the global test set is scored every {every} rounds, so the test column counts in steps of {every}; "
           "the clients' column is scored every round)." if (every := int(base.get("eval-every", 1) or 1)) > 1 else "."),
        "- **s/round**: median wall time per round on this (shared) machine, training + evaluation, mean over seeds; "
        "**MB/round**: model arrays sent server->clients and back per round (training and federated evaluation).",
        "- **norms**: " + norm_legend(norms) + ".",
        "",
    ]
    private = any(math.isfinite(r.epsilon) for r in rows)
    if private:
        delta = base.get("dp-delta", "?")
        out += [f"- **ε**: DP-SGD privacy budget at δ={delta}, cumulative over the run, largest over clients and "
                "seeds; cells with the same target epsilon are compared at equal privacy. Learning-rate tuning on "
                "validation data is not counted in this budget.", ""]
    for p in partitions:
        prow = [r for r in rows if r.partition == p]
        if not prow:
            continue
        out += [f"## {p}", ""]
        out += _table(
            ["norm", "lr", "final test acc", "best test acc", f"rounds to {100 * target:.0f}%",
             "final clients' test acc", f"rounds to {100 * target:.0f}% (clients)", "s/round", "params", "MB/round", "seeds"]
            + (["ε"] if private else []),
            [
                [f"**{r.norm}**" if r.norm == REFERENCE_NORM else r.norm, fmt_lr(r.lrs), pct_ms(r.final), pct_ms(r.best),
                 fmt_target(r.to_target) if math.isfinite(r.final[0]) else "n/a",
                 pct_ms(r.fed_final), fmt_target(r.fed_to_target),
                 f"{r.round_time:.1f}" if math.isfinite(r.round_time) else "n/a",
                 f"{r.params:,}" if r.params else "n/a", fmt_bytes(r.bytes_per_round), str(len(r.seeds))]
                + ([f"{r.epsilon:.2f}" if math.isfinite(r.epsilon) else "∞ (non-private)"] if private else [])
                for r in prow
            ],
        )
        out.append("")

    # paired differences
    paired_lines = []
    for p in partitions:
        for metric, label in (("final_test_accuracy", "final test acc"), ("best_test_accuracy", "best test acc"),
                              ("final_fed_eval_accuracy", "final clients' test acc")):
            pd = paired_difference(records, p, metric)
            if pd is None:
                continue
            ci = f"[{fmt_signed_pct(pd.low)}, {fmt_signed_pct(pd.high)}]" if math.isfinite(pd.low) else "n/a (1 seed)"
            per_seed = ", ".join(f"s{s}: {fmt_signed_pct(d)}" for s, d in zip(pd.seeds, pd.diffs))
            paired_lines.append([p, label, pd.other, fmt_signed_pct(pd.mean), ci, str(len(pd.seeds)), per_seed])
    if paired_lines:
        out += [f"## Paired difference: {REFERENCE_NORM} minus the best other norm", "",
                "Per seed (same partition, same initialization seed, same client sampling), in accuracy points; "
                "the best other norm is the one with the highest mean. 95% t-interval over seeds.", ""]
        out += _table(["partition", "metric", "best other", "mean diff", "95% CI", "seeds", "per seed"], paired_lines)
        out.append("")

    notes = _ordering_notes(rows, partitions)
    if notes:
        out += ["## Ordering", "", "Means over seeds, highest first (checks against the papers' expected ordering "
                "KN >= GN/LN > none; a 'yes' on the means alone is not significant, see the paired intervals):", ""]
        out += notes + [""]

    if tuning:
        out += _tuning_markdown(tuning)

    if plots:
        out += ["## Plots", ""]
        out += [f"![{Path(p).stem}]({p})" for p in plots]
        out.append("")

    if meta.get("command") and finished:
        out += _rerun_markdown(str(meta["command"]), finished[0], bool(meta.get("tuning")))
    if unfinished:
        out += ["## Unfinished runs", ""]
        out += [f"- {r.path.name}: {r.status} ({len([x for x in r.rows if x['round'] >= 1])}/{r.num_rounds} rounds)" for r in unfinished]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _rerun_markdown(command: str, example: RunRecord, tuned: bool) -> list[str]:
    import shlex

    only = f"norm={example.norm},partition={example.partition},seed={example.seed}"
    argv = shlex.split(command)
    fresh = list(argv)
    if "--out" in fresh:
        fresh[fresh.index("--out") + 1] = "/tmp/fedkn-rerun"
    lines = [
        "## Re-running one cell", "",
        "Any cell re-runs alone from the command above plus `--only norm=N,partition=P,seed=S` (same config, "
        "seed, partition, initialization and client sampling); on a CPU machine its metrics.csv reproduces the "
        "accuracy and loss columns of the recorded one (the time columns differ). For example, into a fresh directory"
        + (" (this first re-runs that norm's lr tuning, which is deterministic too)" if tuned else "") + ":", "",
        "```bash", shlex.join([*fresh, "--only", only]), "```", "",
        "or in place, over the recorded run" + (", reusing the recorded tuning scores" if tuned else "") + ":", "",
        "```bash", shlex.join([*argv, "--only", only, "--force"]), "```", "",
    ]
    return lines


def _tuning_markdown(tuning: Mapping[str, Any]) -> list[str]:
    groups = tuning.get("groups", [])
    if not groups:
        return []
    grid = tuning.get("grid", [])
    on = tuning.get("on", "all")
    scope = ("each norm on each partition" if on == "all"
             else f"each norm on partition {on}; the chosen lr is used on every partition")
    out = ["## Learning-rate tuning", "",
           f"Grid {', '.join(f'{v:g}' for v in grid)}; tuned {scope}; seed {tuning.get('seed')}, "
           f"{tuning.get('rounds')} rounds; scored by the final global model's accuracy on the "
           f"{tuning.get('val_source') or 'validation split'} (carved from the clients' training data, never the test set). "
           "Ties go to the lower validation loss. ⚠ marks a choice at the edge of the grid. (The server app "
           "evaluates every round on the test set, so tuning runs' metrics.csv hold test columns too; the choice "
           "reads only val_score.json.)", ""]
    header = ["norm", "partition", *[f"lr {v:g}" for v in grid], "chosen lr"]
    lines = []
    for g in groups:
        scores = {float(p["lr"]): p for p in g["points"]}
        cells = []
        for v in grid:
            p = scores.get(float(v))
            if p is None:
                cells.append("—")
            elif p["status"] != "ok":
                cells.append("diverged")
            else:
                text = f"{100 * p['val_accuracy']:.1f} ({p['val_loss']:.3f})"
                cells.append(f"**{text}**" if float(v) == float(g["lr"]) else text)
        chosen = f"{g['lr']:g}" + (f" ⚠ {g['edge']} edge" if g.get("edge") else "")
        lines.append([g["norm"], g["partition"], *cells, chosen])
    out += ["Validation accuracy % (loss) per grid point:", ""]
    out += _table(header, lines)
    out.append("")
    return out


# --------------------------------------------------------------------------------------------------
# the whole report
# --------------------------------------------------------------------------------------------------


def read_meta(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_meta(out: Path, meta: Mapping[str, Any]) -> None:
    (out / META_FILE).write_text(json.dumps(dict(meta), indent=2) + "\n", encoding="utf-8")


def tuning_summary(out: Path, meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The tuning section's data, rebuilt from ``tune/*/val_score.json``."""
    from fedkn.compare.grid import TUNE_DIR
    from fedkn.compare.tuning import choose, load_points

    points = load_points(out / TUNE_DIR)
    if not points:
        return None
    tmeta = meta.get("tuning") or {}
    grid = [float(v) for v in tmeta.get("grid") or sorted({p.lr for p in points})]
    seed = tmeta.get("seed", points[0].seed)
    groups = []
    keys = list(dict.fromkeys((p.norm, p.partition) for p in points))
    norms = list(meta.get("norms") or [])
    parts = list(meta.get("partitions") or [])
    keys.sort(key=lambda k: (parts.index(k[1]) if k[1] in parts else len(parts), k[1],
                             norms.index(k[0]) if k[0] in norms else len(norms)))
    for norm, partition in keys:
        mine = [p for p in points if p.norm == norm and p.partition == partition and p.seed == seed and p.lr in grid]
        if not mine:
            continue
        try:  # edges are those of the lrs this group tried: groups added later may have a wider grid
            c = choose(mine)
        except FedknError:
            groups.append({"norm": norm, "partition": partition, "lr": math.nan, "edge": "all diverged",
                           "points": [p.to_json() for p in mine]})
            continue
        groups.append({"norm": norm, "partition": partition, "lr": c.lr, "edge": c.edge,
                       "points": [p.to_json() for p in c.points]})
    sources = sorted({p.val_source for p in points if p.val_source})
    return {"grid": grid, "seed": seed, "rounds": tmeta.get("rounds"), "on": tmeta.get("on", "all"),
            "val_source": " / ".join(sources), "groups": groups}


def build_report(out: str | Path, *, target: float | None = None, plots: bool = True) -> Path:
    """Write ``report.md``, ``final_metrics.csv`` (and plots, ``tuning.json``) for ``out``."""
    from fedkn.compare.grid import RUNS_DIR

    root = Path(out)
    if not root.is_dir():
        raise FedknError(f"comparison directory '{out}' does not exist")
    meta = read_meta(root)
    target = float(target if target is not None else meta.get("target", DEFAULT_TARGET))
    if not 0.0 < target <= 1.0:
        raise FedknError(f"--target must be an accuracy in (0, 1], got {target}")
    records = load_runs(root / RUNS_DIR, target)
    if not records:
        raise FedknError(f"'{out}' has no run directories under {RUNS_DIR}/; is it a fedkn compare output directory?")
    norm_order = list(meta.get("norms") or [])
    part_order = list(meta.get("partitions") or [])

    def order(r: RunRecord) -> tuple[int, int, int, str]:
        pi = part_order.index(r.partition) if r.partition in part_order else len(part_order)
        ni = norm_order.index(r.norm) if r.norm in norm_order else len(norm_order)
        return pi, ni, r.seed, r.path.name

    records.sort(key=order)
    write_tidy(records, root / TIDY_FILE, root)
    tuning = tuning_summary(root, meta)
    if tuning:
        (root / "tuning.json").write_text(json.dumps(tuning, indent=2) + "\n", encoding="utf-8")
    pngs: list[str] = []
    if plots:
        from fedkn.compare.plots import plot_accuracy, plot_tuning

        norms = list(meta.get("norms") or dict.fromkeys(r.norm for r in records))
        partitions = list(meta.get("partitions") or dict.fromkeys(r.partition for r in records))
        for metric, name in (("test_accuracy", "accuracy_test.png"), ("fed_eval_accuracy", "accuracy_clients.png")):
            p = plot_accuracy(records, norms, partitions, root / name, metric=metric, target=target)
            if p is not None:
                pngs.append(name)
        if tuning and plot_tuning(tuning, root / "tuning.png") is not None:
            pngs.append("tuning.png")
    text = build_markdown(records, meta=meta, target=target, tuning=tuning, plots=pngs)
    path = root / REPORT_FILE
    path.write_text(text, encoding="utf-8")
    return path
