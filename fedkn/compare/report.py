"""The comparison report: per-run figures, statistics over seeds, paired differences, markdown.

Everything here reads finished run directories (``<out>/runs/*``: config.toml, metrics.csv,
summary.json) and tuning scores (``<out>/tune/*/val_score.json``), so ``fedkn report DIR``
rebuilds the same report an interrupted or finished ``fedkn compare`` wrote.

Accuracy is the **centralized test accuracy** (the global model on the dataset's global test
set). FedBN has no global model worth testing (its BatchNorm layers stay on the clients), so its
centralized columns are empty; the "clients' test" columns (federated evaluation on the clients'
held-out local splits, every client with its own BatchNorm under FedBN) cover every norm.

The **headline accuracy** orders the norms, not a single round's: under label skew the last round
alone is noisy (one BN run on dir0.1 ended 13 points below its best). It is the mean of the
accuracy over the evaluations in the last :data:`HEADLINE_SHARE` of the rounds
(:func:`headline_window`; at least ``eval-every`` rounds wide, so it holds an evaluation), on the
test set, or on the clients' splits where there is no centralized accuracy (FedBN). Its **gain**
is that mean minus the mean over the window of the same width ending :data:`GAIN_SPAN` of the
rounds earlier (at 80% of them): a cell gaining more than :data:`STILL_GAINING` has not
converged and is flagged.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedkn.errors import FedknError
from fedkn.summary import RunSummary

REPORT_FILE = "report.md"
TIDY_FILE = "final_metrics.csv"
META_FILE = "compare.json"
DEFAULT_TARGET = 0.8
#: Reference norm of the paired differences.
REFERENCE_NORM = "kn"
#: Share of the rounds at the end whose evaluations the headline accuracy averages.
HEADLINE_SHARE = 0.1
#: How far back (share of the rounds) the gain compares the headline window with.
GAIN_SPAN = 0.2
#: A mean gain above this (1 accuracy point) flags a cell as still gaining.
STILL_GAINING = 0.01
#: Fewer evaluations than this in a headline window is called out (raise the evaluation frequency).
MIN_WINDOW_EVALS = 3

TIDY_COLUMNS: tuple[str, ...] = (
    "norm",
    "partition",
    "seed",
    "lr",
    "dp_epsilon",
    "status",
    "rounds",
    "headline_accuracy",
    "headline_metric",
    "headline_rounds",
    "headline_evals",
    "gain_last20",
    "headline_test_accuracy",
    "headline_fed_eval_accuracy",
    "final_test_accuracy",
    "best_test_accuracy",
    "best_test_round",
    "final_test_loss",
    "rounds_to_target",
    "seconds_to_target",
    "final_fed_eval_accuracy",
    "best_fed_eval_accuracy",
    "final_fed_eval_loss",
    "rounds_to_target_fed",
    "seconds_to_target_fed",
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


def headline_window(num_rounds: int, eval_every: int = 1, *, end: int | None = None) -> tuple[int, int]:
    """(first, last) round of the window the headline averages: the last ``ceil(HEADLINE_SHARE *
    num_rounds)`` rounds up to ``end`` (default: the last round), widened to ``eval_every`` rounds
    so that it holds an evaluation of the test set; never round 0 (the untrained model)."""
    width = max(math.ceil(HEADLINE_SHARE * num_rounds - 1e-9), eval_every, 1)
    last = num_rounds if end is None else end
    return max(1, last - width + 1), last


def gain_window(num_rounds: int, eval_every: int = 1) -> tuple[int, int]:
    """The headline window's width, ending ``ceil(GAIN_SPAN * num_rounds)`` rounds before the last."""
    first, last = headline_window(num_rounds, eval_every)
    end = num_rounds - math.ceil(GAIN_SPAN * num_rounds - 1e-9)
    return max(1, end - (last - first)), end


def window_mean(rows: Sequence[Mapping[str, Any]], key: str, window: tuple[int, int]) -> tuple[float, int]:
    """(mean, count) of ``key`` over the rows of the rounds in ``window`` that evaluated it."""
    v = finite(r.get(key) for r in rows if window[0] <= int(r["round"]) <= window[1])
    return (float(np.mean(v)) if v else math.nan), len(v)


def headline(rows: Sequence[Mapping[str, Any]], key: str, num_rounds: int, eval_every: int = 1) -> tuple[float, int, float]:
    """(headline accuracy, evaluations it averages, gain over the last GAIN_SPAN of the rounds)."""
    value, evals = window_mean(rows, key, headline_window(num_rounds, eval_every))
    before, _ = window_mean(rows, key, gain_window(num_rounds, eval_every))
    return value, evals, value - before


def seconds_to(rows: Sequence[Mapping[str, Any]], round_: int | None) -> float | None:
    """Wall seconds of rounds 1..``round_`` (their ``round_time_s``, training + evaluation, summed;
    Ray's start-up and round 0's evaluation of the untrained model left out); None for None."""
    if round_ is None:
        return None
    return float(sum(finite(r.get("round_time_s") for r in rows if 1 <= int(r["round"]) <= round_)))


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
    summary: RunSummary
    path: Path
    num_rounds: int
    eval_every: int = 1
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def _metric_rows(path: Path) -> list[dict[str, float]]:
    from fedkn.results import RunDir

    return RunDir(path).read_metrics()


def load_run(path: Path, target: float) -> RunRecord | None:
    """One run directory as a record with its final figures; None if it is not a run."""
    from fedkn.compare.grid import norm_label
    from fedkn.results import CONFIG_FILE, RunDir

    if not (path / CONFIG_FILE).is_file():
        return None
    cfg = RunDir(path).read_config()
    rows = _metric_rows(path)
    summary = RunSummary.read(path)
    status = summary.status
    if status == "finished" and summary.rounds_completed < cfg.federation.num_rounds:
        status = "partial"
    rec = RunRecord(norm_label(cfg), cfg.data.partition, cfg.run.seed, cfg.train.lr, status, rows, summary, path, cfg.federation.num_rounds, cfg.federation.eval_every)
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
    head_test, evals_test, gain_test = headline(rows, "test_accuracy", cfg.federation.num_rounds, cfg.federation.eval_every)
    head_fed, evals_fed, gain_fed = headline(rows, "fed_eval_accuracy", cfg.federation.num_rounds, cfg.federation.eval_every)
    central = math.isfinite(head_test)  # else FedBN (no global model): the clients' accuracy
    to_target, to_target_fed = rounds_to_target(rows, target, "test_accuracy"), rounds_to_target(rows, target, "fed_eval_accuracy")
    first, last_round = headline_window(cfg.federation.num_rounds, cfg.federation.eval_every)
    rec.figures = {
        "rounds": int(last.get("round", 0)),
        "headline_accuracy": head_test if central else head_fed,
        "headline_metric": "test_accuracy" if central else "fed_eval_accuracy",
        "headline_rounds": f"{first}-{last_round}",
        "headline_evals": evals_test if central else evals_fed,
        "gain_last20": gain_test if central else gain_fed,
        "headline_test_accuracy": head_test,
        "headline_fed_eval_accuracy": head_fed,
        "final_test_accuracy": last.get("test_accuracy", math.nan),
        "best_test_accuracy": best_test,
        "best_test_round": best_round,
        "final_test_loss": last.get("test_loss", math.nan),
        "rounds_to_target": to_target,
        "seconds_to_target": seconds_to(rows, to_target),
        "final_fed_eval_accuracy": last.get("fed_eval_accuracy", math.nan),
        "best_fed_eval_accuracy": best_fed,
        "final_fed_eval_loss": last.get("fed_eval_loss", math.nan),
        "rounds_to_target_fed": to_target_fed,
        "seconds_to_target_fed": seconds_to(rows, to_target_fed),
        "final_train_loss": last.get("train_loss", math.nan),
        "median_round_time_s": float(np.median(times)) if times else math.nan,
        "elapsed_s": last.get("elapsed_s", math.nan),
        "model_parameters": summary.model_parameters,
        "bytes_per_round": float(np.mean(sent)) if sent else math.nan,
        # DP-SGD: the run's cumulative epsilon (max over clients); NaN for non-private runs.
        "dp_epsilon": float(summary.dp_epsilon) if summary.dp_epsilon is not None else math.nan,
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
    from fedkn.results import csv_cell

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
            w.writerow([csv_cell(row.get(c), missing="") for c in TIDY_COLUMNS])


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
    #: Headline accuracy (test; the clients' where ``clients_headline``), its gain, fewest evaluations.
    headline: tuple[float, float, int]
    clients_headline: bool
    gain: float
    evals: int
    final: tuple[float, float, int]
    best: tuple[float, float, int]
    to_target: list[int | None]
    seconds_to_target: list[float | None]
    fed_headline: tuple[float, float, int]
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
                    headline=mean_std(x["headline_accuracy"] for x in f),
                    clients_headline=any(x["headline_metric"] != "test_accuracy" for x in f),
                    gain=float(np.mean(g)) if (g := finite(x["gain_last20"] for x in f)) else math.nan,
                    evals=min(x["headline_evals"] for x in f),
                    final=mean_std(x["final_test_accuracy"] for x in f),
                    best=mean_std(x["best_test_accuracy"] for x in f),
                    to_target=[x["rounds_to_target"] for x in f],
                    seconds_to_target=[x["seconds_to_target"] for x in f],
                    fed_headline=mean_std(x["headline_fed_eval_accuracy"] for x in f),
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
    metric: str  # the figure compared: headline_test_accuracy, or headline_fed_eval_accuracy where the other has no test figure
    other: str
    seeds: list[int]
    diffs: list[float]
    mean: float
    low: float
    high: float


#: The figures a paired difference compares, in order of preference.
PAIRED_METRICS: tuple[str, ...] = ("headline_test_accuracy", "headline_fed_eval_accuracy")


def paired_differences(records: Sequence[RunRecord], partition: str, reference: str = REFERENCE_NORM) -> list[Paired]:
    """``reference`` minus every other norm on the headline accuracy, paired by seed.

    Seeds pair runs with the same partition, initialization and client sampling. The figure is
    the headline test accuracy where both norms have it for their common seeds, else (FedBN) the
    headline of the clients' accuracy for both. The interval is the 95% t-interval of the per-seed
    differences. Norms in record order; one without a common seed is left out.
    """
    values: dict[str, dict[str, dict[int, float]]] = {m: {} for m in PAIRED_METRICS}
    for r in records:
        if r.partition == partition and r.finished:
            for m in PAIRED_METRICS:
                v = r.figures.get(m)
                if v is not None and math.isfinite(v):
                    values[m].setdefault(r.norm, {})[r.seed] = float(v)
    others = dict.fromkeys(r.norm for r in records if r.partition == partition and r.finished and r.norm != reference)
    out = []
    for n in others:
        for m in PAIRED_METRICS:
            ref, other = values[m].get(reference, {}), values[m].get(n, {})
            seeds = sorted(set(ref) & set(other))
            if seeds:
                diffs = [ref[s] - other[s] for s in seeds]
                mean, lo, hi, _ = t_interval(diffs)
                out.append(Paired(partition, m, n, seeds, diffs, mean, lo, hi))
                break
    return out


# --------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------


def pct_ms(ms: tuple[float, float, int]) -> str:
    m, s, n = ms
    if n == 0 or not math.isfinite(m):
        return "n/a"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if math.isfinite(s) else f"{100 * m:.1f}"


def _fmt_reached(values: Sequence[float | None], show: Callable[[list[float]], str]) -> str:
    """``show`` of the seeds that reached the target, with how many did when not all."""
    hit = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if not hit:
        return f"never (0/{len(values)})"
    text = show(hit)
    return text if len(hit) == len(values) else f"{text} ({len(hit)}/{len(values)} seeds)"


def fmt_target(values: Sequence[int | None]) -> str:
    """Mean rounds to the target over the seeds that reached it."""
    return _fmt_reached(values, lambda hit: f"{float(np.mean(hit)):.1f}" if len(hit) > 1 else f"{hit[0]}")


def fmt_lr(lrs: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in lrs) if lrs else "n/a"


def fmt_bytes(b: float) -> str:
    return "n/a" if not math.isfinite(b) else f"{b / 1e6:.2f}"


def fmt_signed_pct(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{100 * v:+.1f}"


def fmt_gain(v: float) -> str:
    """Points gained over the last GAIN_SPAN of the rounds, ↑ when still gaining."""
    return fmt_signed_pct(v) + (" ↑" if math.isfinite(v) and v > STILL_GAINING else "")


def fmt_seconds(values: Sequence[float | None]) -> str:
    """Mean seconds to the target over the seeds that reached it."""
    return _fmt_reached(values, lambda hit: f"{float(np.mean(hit)):.0f}")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _ordering_notes(rows: Sequence[Row], partitions: Sequence[str]) -> list[str]:
    """Mechanical checks of the papers' expected ordering, from the means (see report text)."""
    notes = []

    def mean(p: str, n: str) -> float:
        for r in rows:
            if r.partition == p and r.norm == n and not r.clients_headline:
                return r.headline[0]
        return math.nan

    for p in partitions:
        ranked = sorted((r for r in rows if r.partition == p and math.isfinite(r.fed_headline[0])), key=lambda r: -r.fed_headline[0])
        central = sorted((r for r in rows if r.partition == p and not r.clients_headline and math.isfinite(r.headline[0])),
                         key=lambda r: -r.headline[0])
        if not central and not ranked:
            continue
        parts = []
        if central:
            parts.append("headline test acc: " + " > ".join(f"{r.norm} {100 * r.headline[0]:.1f}" for r in central))
        if ranked:
            parts.append("clients' headline acc: " + " > ".join(f"{r.norm} {100 * r.fed_headline[0]:.1f}" for r in ranked))
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
    base = meta.get("base_config") or (finished[0].summary.config if finished else {}) or {}

    out = _intro_markdown(meta, base, finished, unfinished, norms, target)
    private = any(math.isfinite(r.epsilon) for r in rows)
    if private:
        delta = base.get("dp-delta", "?")
        out += [(f"- **ε**: DP-SGD privacy budget at δ={delta}, cumulative over the run, largest over clients and "
                "seeds; cells with the same target epsilon are compared at equal privacy. Learning-rate tuning on "
                "validation data is not counted in this budget."), ""]
    out += _partition_tables(rows, partitions, target, private)
    out += _convergence_markdown(rows, finished, partitions)

    out += _paired_markdown(records, partitions)
    notes = _ordering_notes(rows, partitions)
    if notes:
        out += ["## Ordering", "", ("Means over seeds, highest first (checks against the papers' expected ordering "
                "KN >= GN/LN > none; a 'yes' on the means alone is not significant, see the paired intervals):"), ""]
        out += notes + [""]

    if tuning:
        out += _tuning_markdown(tuning, sum(finite(r.figures["elapsed_s"] for r in finished)))

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


def _intro_markdown(meta: Mapping[str, Any], base: Mapping[str, Any], finished: Sequence[RunRecord],
                    unfinished: Sequence[RunRecord], norms: Sequence[str], target: float) -> list[str]:
    """The title, the command, the setup and what every column means."""
    out: list[str] = ["# Normalization comparison", ""]
    if meta.get("note"):
        out += [f"> {line}".rstrip() for line in str(meta["note"]).splitlines()] + [""]
    planned = len(meta.get("norms") or ()) * len(meta.get("partitions") or ()) * len(meta.get("seeds") or ())
    if len(finished) < planned:
        out += [(f"> **Partial**: {len(finished)} of the {planned} cells of the command below have finished; the "
                 "tables hold those only. Rerun the command to continue."), ""]
    if meta.get("command"):
        out += ["Produced by:", "", "```bash", str(meta["command"]), "```", ""]
    if base:
        keys = ("dataset", "model", "width", "num-clients", "num-rounds", "fraction-train", "fraction-evaluate",
                "batch-size", "local-epochs", "local-steps", "lr", "momentum", "weight-decay", "test-fraction",
                "eval-every")
        if meta.get("tuning"):
            keys = tuple(k for k in keys if k != "lr")  # per cell, tuned (see the tables)
        shown = ", ".join(f"{k} {base[k]}" for k in keys if k in base)
        if overrides := meta.get("eval_every"):
            shown += " (" + ", ".join(f"{p}: {k}" for p, k in overrides.items()) + ")"
        out += [(f"Setup: {shown}. Everything else is identical across cells; all cells of a seed share "
                "partition, initialization seed and client sampling."), ""]
    seeds = sorted({r.seed for r in finished})
    devices = Counter(r.summary.device or "unrecorded" for r in finished)
    out += [
        f"Runs: {len(finished)} finished" + (f", {len(unfinished)} unfinished (not in the tables)" if unfinished else "")
        + f"; seeds {', '.join(map(str, seeds)) or 'none'}; ran on {', '.join(f'{d} ({n})' for d, n in devices.items())}"
        " (runs agree bit for bit only on the same device). Accuracies in %, mean ± std over seeds (sample std).",
        "",
        "- **headline acc** (orders the norms): the mean of the global model's accuracy on the global test set "
        f"(centralized) over its evaluations in the last {100 * HEADLINE_SHARE:.0f}% of the rounds ("
        + _windows(finished, headline_window) + "; see Convergence); † = the same mean of the clients' test "
        "accuracy, for FedBN, which has no usable global model (BatchNorm stays on the clients).",
        f"- **gain**: the headline minus the same mean over the window of the same width ending "
        f"{100 * GAIN_SPAN:.0f}% of the rounds earlier (" + _windows(finished, gain_window) + "), in points, mean over "
        f"seeds; ↑ = still gaining more than {100 * STILL_GAINING:.0f} point: not converged.",
        "- **final / best test acc**: global test set after the last round / at the best round; n/a for FedBN.",
        ("- **clients' headline acc**: the headline mean of the federated evaluation on the clients' held-out local "
        "splits (each client with its own BatchNorm under FedBN)."),
        f"- **rounds / s to {100 * target:.0f}%**: first round reaching the target and the wall seconds of rounds 1 "
        "to it (their round times summed: training + evaluation, without Ray's start-up and round 0), mean over "
        "the seeds that reached it"
        + (" (the test column counts in steps of eval-every, the rounds the global test set is scored at; the "
           "clients' column is scored every round)." if any(r.eval_every > 1 for r in finished) else "."),
        ("- **s/round**: median wall time per round on this (shared) machine, training + evaluation, mean over seeds; "
        "**MB/round**: model arrays sent server->clients and back per round (training and federated evaluation)."),
        "- **norms**: " + norm_legend(norms) + ".",
        "",
    ]
    return out


def _partition_tables(rows: Sequence[Any], partitions: Sequence[str], target: float, private: bool) -> list[str]:
    """One table per partition: every norm's figures, mean ± std over seeds."""
    out: list[str] = []
    for p in partitions:
        prow = [r for r in rows if r.partition == p]
        if not prow:
            continue
        out += [f"## {p}", ""]
        out += _table(
            ["norm", "lr", "headline acc", "gain", "final test acc", "best test acc", f"rounds to {100 * target:.0f}%",
             f"s to {100 * target:.0f}%", "clients' headline acc", f"rounds to {100 * target:.0f}% (clients)", "s/round",
             "params", "MB/round", "seeds"]
            + (["ε"] if private else []),
            [
                [f"**{r.norm}**" if r.norm == REFERENCE_NORM else r.norm, fmt_lr(r.lrs),
                 pct_ms(r.headline) + (" †" if r.clients_headline else ""), fmt_gain(r.gain), pct_ms(r.final), pct_ms(r.best),
                 fmt_target(r.to_target) if math.isfinite(r.final[0]) else "n/a",
                 fmt_seconds(r.seconds_to_target) if math.isfinite(r.final[0]) else "n/a",
                 pct_ms(r.fed_headline), fmt_target(r.fed_to_target),
                 f"{r.round_time:.1f}" if math.isfinite(r.round_time) else "n/a",
                 f"{r.params:,}" if r.params else "n/a", fmt_bytes(r.bytes_per_round), str(len(r.seeds))]
                + ([f"{r.epsilon:.2f}" if math.isfinite(r.epsilon) else "∞ (non-private)"] if private else [])
                for r in prow
            ],
        )
        out.append("")

    return out


def _paired_markdown(records: Sequence[RunRecord], partitions: Sequence[str]) -> list[str]:
    """The paired differences of the reference norm against every other norm, per partition."""
    out: list[str] = []
    paired_lines = []
    for p in partitions:
        for pd in paired_differences(records, p):
            ci = f"[{fmt_signed_pct(pd.low)}, {fmt_signed_pct(pd.high)}]" if math.isfinite(pd.low) else "n/a (1 seed)"
            per_seed = ", ".join(f"s{s}: {fmt_signed_pct(d)}" for s, d in zip(pd.seeds, pd.diffs))
            what = "headline test acc" if pd.metric == "headline_test_accuracy" else "clients' headline acc"
            paired_lines.append([p, pd.other, what, fmt_signed_pct(pd.mean), ci, str(len(pd.seeds)), per_seed])
    if paired_lines:
        out += [f"## Paired differences: {REFERENCE_NORM} minus every other norm", "",
                ("On the headline accuracy, per seed (same partition, same initialization seed, same client sampling), "
                "in accuracy points, with the 95% t-interval over seeds; against FedBN on the clients' headline "
                "accuracy of both (FedBN has no test figure). An interval that holds 0 does not separate the two."), ""]
        out += _table(["partition", "other norm", "metric", "mean diff", "95% CI", "seeds", "per seed"], paired_lines)
        out.append("")

    return out


def _windows(records: Sequence[RunRecord], window: Any) -> str:
    """The rounds ``window(num_rounds, eval_every)`` spans, for each setting the runs have."""
    spans = dict.fromkeys(window(r.num_rounds, r.eval_every) for r in records)
    return ", ".join(f"rounds {a}-{b}" if b > a else f"round {b}" for a, b in spans) or "no finished run"


def _convergence_markdown(rows: Sequence[Row], records: Sequence[RunRecord], partitions: Sequence[str]) -> list[str]:
    """The headline's window, too few evaluations in it, and the cells still gaining."""
    if not rows:
        return []
    out = ["## Convergence", "",
           (f"Headline window: {_windows(records, headline_window)} (the last {100 * HEADLINE_SHARE:.0f}% of the rounds, "
           "at least eval-every rounds wide); gain: headline minus the mean over "
           f"{_windows(records, gain_window)} (the same width, ending {100 * GAIN_SPAN:.0f}% of the rounds earlier)."), ""]
    few = [r for r in records if r.figures["headline_evals"] < MIN_WINDOW_EVALS]
    if few:
        counts = ", ".join(str(n) for n in sorted({r.figures["headline_evals"] for r in few}))
        out += [(f"⚠ In {len(few)} of {len(records)} runs the headline window holds fewer than {MIN_WINDOW_EVALS} "
                f"evaluations ({counts}): the headline is close to a single round's accuracy. Evaluate more often "
                f"(a smaller eval-every; where it is 1 already, more rounds) so that it averages at least "
                f"{MIN_WINDOW_EVALS}."), ""]
    gaining = {p: [r for r in rows if r.partition == p and r.gain > STILL_GAINING] for p in partitions}
    listed = "; ".join(f"{p}: " + ", ".join(f"{r.norm} ({fmt_signed_pct(r.gain)})" for r in g) for p, g in gaining.items() if g)
    out += [f"↑ Still gaining more than {100 * STILL_GAINING:.0f} point over the last {100 * GAIN_SPAN:.0f}% of the "
            f"rounds (mean over seeds), so not converged: {listed}." if listed else
            f"No cell gains more than {100 * STILL_GAINING:.0f} point over the last {100 * GAIN_SPAN:.0f}% of the rounds.", ""]
    return out


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
        "seed, partition, initialization and client sampling); on the same device as the recorded run (its "
        "summary.json names it, e.g. `cpu (AVX512)`: torch picks kernels by CPU capability) its metrics.csv "
        "reproduces the accuracy and loss columns of the recorded one (the time columns differ). For example, into a "
        "fresh directory"
        + (" (this first re-runs that norm's lr tuning, which is deterministic too)" if tuned else "") + ":", "",
        "```bash", shlex.join([*fresh, "--only", only]), "```", "",
        "or in place, over the recorded run" + (", reusing the recorded tuning scores" if tuned else "") + ":", "",
        "```bash", shlex.join([*argv, "--only", only, "--force"]), "```", "",
    ]
    return lines


def _tuning_markdown(tuning: Mapping[str, Any], cells_seconds: float) -> list[str]:
    from fedkn.compare.grid import fmt_duration
    from fedkn.compare.tuning import MAX_EXTENSIONS, NEAR_CHANCE_FACTOR

    groups = tuning.get("groups", [])
    if not groups:
        return []
    grid = tuning.get("grid", [])
    on = tuning.get("on", "all")
    scope = ("each norm on each partition" if on == "all"
             else f"each norm on partition {on}; the chosen lr is used on every partition")
    cost = tuning.get("cost") or {}
    rounds = ", ".join(str(r) for r in cost.get("rounds", [])) or str(tuning.get("rounds"))
    chance = tuning.get("chance", math.nan)
    out = ["## Learning-rate tuning", "",
           f"Grid {', '.join(f'{v:g}' for v in grid)}; tuned {scope}; seed {tuning.get('seed')}; scored by the mean "
           "accuracy of the global models of a run's last rounds (column 'models averaged'; 1 = the final model alone, "
           f"as in runs tuned before that window existed; a norm keeps one window on a partition) on the "
           f"{tuning.get('val_source') or 'validation split'} (carved from the clients' "
           "training data, never the test set). Ties go to the lower validation loss. A choice at the lowest or highest "
           f"lr tried extends the grid by one lr beyond it (the grid's log spacing), up to {MAX_EXTENSIONS} times; "
           "⚠ marks a choice still at an edge. "
           + (f"⚠ near chance: the best score is below {NEAR_CHANCE_FACTOR:g}x chance ({100 * NEAR_CHANCE_FACTOR * chance:.1f}%), "
              "so the lrs were not told apart and the choice is unusable (fedkn compare now stops there and asks for "
              "longer tuning runs). " if any(g.get("near_chance") for g in groups) else "")
           + "(The server app evaluates the test set at round 0 and the end of tuning runs too; the choice reads "
           "only val_score.json.)", "",
           f"**Cost**: {cost.get('runs', 0)} tuning runs of {rounds} rounds each, "
           f"{fmt_duration(cost.get('seconds', 0.0))} of wall time in all"
           + (f" ({cost['timed']} of them timed)" if cost.get("timed", 0) != cost.get("runs", 0) else "")
           + f" (the sum of their elapsed_s), against {fmt_duration(cells_seconds)} for the grid's finished cells.", ""]
    lrs = sorted({float(p["lr"]) for g in groups for p in g["points"]} | {float(v) for v in grid})
    header = ["norm", "partition", *[f"lr {v:g}" for v in lrs], "models averaged", "chosen lr"]
    lines = []
    for g in groups:
        scores = {float(p["lr"]): p for p in g["points"]}
        cells = []
        for v in lrs:
            p = scores.get(v)
            if p is None:
                cells.append("—")
            elif p["status"] != "ok":
                cells.append("diverged")
            else:
                text = f"{100 * p['val_accuracy']:.1f} ({p['val_loss']:.3f})"
                cells.append(f"**{text}**" if v == float(g["lr"]) else text)
        flags = []
        if g.get("edge"):
            flags.append(f"⚠ {g['edge']} edge" + (f" after {len(g['extended'])} extensions" if g.get("capped") else ""))
        elif g.get("extended"):
            flags.append(f"(grid extended to {', '.join(f'{v:g}' for v in g['extended'])})")
        if g.get("near_chance"):
            flags.append("⚠ near chance: unusable")
        averaged = sorted({int(p.get("val_models") or 1) for p in g["points"] if p["status"] == "ok"})
        lines.append([g["norm"], g["partition"], *cells, ", ".join(map(str, averaged)) or "—",
                      " ".join([f"{g['lr']:g}", *flags])])
    out += ["Validation accuracy % (loss) per lr tried:", ""]
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
    """Write ``compare.json``, keeping the ``note`` an earlier one holds (a label put at the top of
    the report by hand, e.g. "early-training snapshot"), so re-running the command keeps it."""
    values = dict(meta)
    note = read_meta(out).get("note")
    if note and "note" not in values:
        values["note"] = note
    (out / META_FILE).write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")


def tuning_summary(out: Path, meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The tuning section's data, rebuilt from ``tune/*``: the choices (replayed as ``fedkn compare``
    makes them, extensions past an edge included), near-chance groups, and the runs' length and cost."""
    from fedkn.compare.grid import TUNE_DIR
    from fedkn.compare.tuning import (
        chance_level,
        grid_step,
        load_points,
        near_chance,
        planned_rounds,
        run_seconds,
        search,
    )
    from fedkn.results import RunDir

    tune_dir = out / TUNE_DIR
    points = load_points(tune_dir)
    if not points:
        return None
    tmeta = meta.get("tuning") or {}
    grid = [float(v) for v in tmeta.get("grid") or sorted({p.lr for p in points})]
    seed = tmeta.get("seed", points[0].seed)
    try:
        chance = chance_level(RunDir(tune_dir / points[0].run).read_config())
    except FedknError:  # the dataset is not on this machine: the near-chance check is left out
        chance = math.nan
    groups = []
    keys = list(dict.fromkeys((p.norm, p.partition) for p in points))
    norms = list(meta.get("norms") or [])
    parts = list(meta.get("partitions") or [])
    keys.sort(key=lambda k: (parts.index(k[1]) if k[1] in parts else len(parts), k[1],
                             norms.index(k[0]) if k[0] in norms else len(norms)))
    for norm, partition in keys:
        mine = {p.lr: p for p in points if p.norm == norm and p.partition == partition and p.seed == seed}
        tried = [v for v in grid if v in mine]  # edges are those of the lrs this group tried (a grid may be widened later)
        if not tried:
            continue
        try:
            c = search(tried, mine.get, step=grid_step(grid))
        except FedknError:
            groups.append({"norm": norm, "partition": partition, "lr": math.nan, "edge": "all diverged",
                           "points": [mine[v].to_json() for v in tried]})
            continue
        groups.append({"norm": norm, "partition": partition, "lr": c.lr, "edge": c.edge, "extended": list(c.extended),
                       "capped": c.capped, "near_chance": math.isfinite(chance) and near_chance(c, chance),
                       "points": [p.to_json() for p in c.points]})
    sources = sorted({p.val_source for p in points if p.val_source})
    runs = [tune_dir / p.run for p in points]
    seconds = finite(run_seconds(d) for d in runs)
    return {"grid": grid, "seed": seed, "rounds": tmeta.get("rounds"), "on": tmeta.get("on", "all"),
            "val_source": " / ".join(sources), "chance": chance, "groups": groups,
            "cost": {"runs": len(runs), "rounds": sorted({r for d in runs if (r := planned_rounds(d)) is not None}),
                     "seconds": float(sum(seconds)), "timed": len(seconds)}}


def build_report(
    out: str | Path, *, target: float | None = None, plots: bool = True, require_finished: bool = False
) -> Path:
    """Write ``report.md``, ``final_metrics.csv`` (and plots, ``tuning.json``) for ``out``.

    ``require_finished`` is for ``fedkn report``: a directory whose runs all stopped early has no
    table to show, and an empty report would read as success. ``fedkn compare`` still writes one,
    since it lists why its cells stopped.
    """
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
    if require_finished and not any(r.finished for r in records):
        raise FedknError(
            f"'{out}' has no finished run ({len(records)} under {RUNS_DIR}/ stopped early or are still running); "
            "nothing to report"
        )
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
        for metric, stem in (("test_accuracy", "accuracy_test"), ("fed_eval_accuracy", "accuracy_clients")):
            for x, suffix in (("round", ""), ("seconds", "_seconds")):
                name = f"{stem}{suffix}.png"
                if plot_accuracy(records, norms, partitions, root / name, metric=metric, target=target, x=x) is not None:
                    pngs.append(name)
        if tuning and plot_tuning(tuning, root / "tuning.png") is not None:
            pngs.append("tuning.png")
    text = build_markdown(records, meta=meta, target=target, tuning=tuning, plots=pngs)
    path = root / REPORT_FILE
    path.write_text(text, encoding="utf-8")
    return path
