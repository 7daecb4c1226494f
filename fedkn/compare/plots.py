"""Comparison plots: accuracy per round and per wall-clock second (one panel per partition, one
line per norm, seed band), so a norm that is slower per step shows what that costs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Fixed colours so a norm looks the same in every plot: the layer norms by name, the rule norms
#: (:data:`fedkn.config.RULE_NORMS`) in their registry order.
COLORS: dict[str, str] = {
    "kn": "tab:red",
    "gn": "tab:blue",
    "ln": "tab:green",
    "bn": "tab:orange",
    "nf": "tab:brown",
    "none": "tab:gray",
    "wsgn": "tab:cyan",
}
RULE_COLORS: tuple[str, ...] = ("tab:purple", "tab:olive", "tab:pink")


def color(norm: str) -> str | None:
    """The plot colour of a grid label (None: matplotlib's next one)."""
    from fedkn.config import RULE_NORMS

    if norm in COLORS:
        return COLORS[norm]
    rules = list(RULE_NORMS)
    return RULE_COLORS[rules.index(norm) % len(RULE_COLORS)] if norm in rules else None
TITLES = {"test_accuracy": "global test accuracy (centralized)", "fed_eval_accuracy": "clients' test accuracy (federated)"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def curves(records: Sequence[Any], norm: str, partition: str, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(rounds, values[seed, round], seconds[seed, round]) of the finished runs of one norm on one
    partition; seconds are the wall time of rounds 1..round (round times summed; round 0 is 0)."""
    series, clocks = [], []
    for r in records:
        if r.norm != norm or r.partition != partition or not r.finished:
            continue
        series.append({int(x["round"]): x.get(metric, math.nan) for x in r.rows})
        spent = [x.get("round_time_s", math.nan) if int(x["round"]) >= 1 else 0.0 for x in r.rows]
        clocks.append(dict(zip((int(x["round"]) for x in r.rows), np.cumsum(np.nan_to_num(spent)))))
    if not series:
        return None
    rounds = sorted(set.intersection(*(set(s) for s in series)))
    arr = np.array([[s[k] for k in rounds] for s in series], dtype=np.float64)
    secs = np.array([[c[k] for k in rounds] for c in clocks], dtype=np.float64)
    keep = ~np.all(np.isnan(arr), axis=0)
    if not keep.any():
        return None
    return np.asarray(rounds)[keep], arr[:, keep], secs[:, keep]


def plot_accuracy(
    records: Sequence[Any],
    norms: Sequence[str],
    partitions: Sequence[str],
    path: Path,
    *,
    metric: str = "test_accuracy",
    target: float | None = None,
    x: str = "round",
) -> Path | None:
    """Mean accuracy over seeds per round, with a min-max band over seeds; None if nothing to plot.

    ``x="seconds"`` puts each round at its wall-clock time instead (round times summed, mean over
    seeds), so norms are compared at equal compute time on this machine.
    """
    panels = [p for p in partitions if any(r.partition == p and r.finished for r in records)]
    if not panels:
        return None
    plt = _plt()
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(max(4.6 * cols, 7.0), 3.6 * nrows), squeeze=False, sharey=True)
    drew = False
    for ax, p in zip(axes.flat, panels):
        for n in norms:
            c = curves(records, n, p, metric)
            if c is None:
                continue
            rounds, arr, secs = c
            scored = np.isfinite(arr).any(axis=0)  # rounds without evaluation (eval-every > 1) are skipped
            if not scored.any():
                continue
            arr = arr[:, scored]
            where = np.asarray(rounds)[scored] if x == "round" else secs[:, scored].mean(axis=0)
            mean = np.nanmean(arr, axis=0)
            c = color(n)
            ax.plot(where, mean, label=f"{n} (n={arr.shape[0]})", color=c, lw=1.6)
            if arr.shape[0] > 1:
                ax.fill_between(where, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), color=c, alpha=0.15, lw=0)
            drew = True
        if target is not None:
            ax.axhline(target, color="k", ls=":", lw=0.8)
        ax.set(title=p, xlabel="round" if x == "round" else "wall-clock seconds (round times summed)", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if not drew:
        plt.close(fig)
        return None
    per = "per round" if x == "round" else "against wall-clock time (x: mean over seeds)"
    fig.suptitle(f"{TITLES.get(metric, metric)} {per}: mean over seeds, band = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_tuning(tuning: Mapping[str, Any], path: Path) -> Path | None:
    """Validation accuracy against lr, one line per norm, one panel per tuned partition."""
    groups = tuning.get("groups") or []
    parts = list(dict.fromkeys(g["partition"] for g in groups))
    if not parts:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(parts), figsize=(4.6 * len(parts), 3.6), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], parts):
        for g in groups:
            if g["partition"] != p:
                continue
            pts = sorted(g["points"], key=lambda x: x["lr"])
            lrs = [x["lr"] for x in pts]
            acc = [x["val_accuracy"] if x["status"] == "ok" and x["val_accuracy"] is not None else math.nan for x in pts]
            c = color(g["norm"])
            ax.plot(lrs, acc, marker="o", ms=3, label=g["norm"], color=c)
            if math.isfinite(g.get("lr", math.nan)):
                chosen = [a for lr, a in zip(lrs, acc) if lr == g["lr"]]
                if chosen:
                    ax.plot([g["lr"]], chosen, marker="*", ms=11, color=c)
        ax.set(xscale="log", title=f"tuning on {p}", xlabel="lr", ylim=(0, 1))
        ticks = sorted({float(x["lr"]) for g in groups if g["partition"] == p for x in g["points"]})
        ax.minorticks_off()
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks], fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("validation accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
