"""What a partition looks like: label counts per client, a non-IID score, a heat map and a JSON record.

Used by ``fedkn partition`` so a partition can be inspected before paying for a training run.
Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so
this is safe to call on headless machines and from other code that uses matplotlib.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

#: Beyond this many classes the table lists each client's top classes instead of every column.
_WIDE_TABLE_CLASSES = 20
#: Heat-map cells are annotated with their count only when there are at most this many.
_ANNOTATE_CELLS = 400


def label_counts(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) matrix of sample counts."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def noniid_summary(counts: np.ndarray) -> dict[str, float]:
    """How far client label mixes are from the global one.

    ``mean_tv``/``max_tv``: total-variation distance between each client's label distribution and
    the global one (0 = same mix as the whole dataset, 1 = disjoint). ``mean_classes``: classes
    present per client. ``min_size``/``max_size``: samples per client.
    """
    sizes = counts.sum(axis=1)
    global_mix = counts.sum(axis=0) / counts.sum()
    client_mix = counts / np.maximum(sizes, 1)[:, None]
    tv = 0.5 * np.abs(client_mix - global_mix).sum(axis=1)
    return {
        "mean_tv": float(tv.mean()),
        "max_tv": float(tv.max()),
        "mean_classes": float((counts > 0).sum(axis=1).mean()),
        "min_size": float(sizes.min()),
        "max_size": float(sizes.max()),
    }


def format_summary(summary: dict[str, float]) -> str:
    return (
        f"non-IID: mean TV distance to the global label mix {summary['mean_tv']:.3f} "
        f"(max {summary['max_tv']:.3f}; 0 = IID, 1 = disjoint), "
        f"{summary['mean_classes']:.1f} classes per client, "
        f"{int(summary['min_size'])}..{int(summary['max_size'])} samples per client"
    )


def format_table(counts: np.ndarray, classes: Sequence[str]) -> str:
    """Clients x classes counts plus totals, as aligned text; top classes only when very wide."""
    sizes = counts.sum(axis=1)
    if counts.shape[1] > _WIDE_TABLE_CLASSES:
        lines = [f"{'client':>6} {'total':>6} {'classes':>7}  top classes (label:count)"]
        for i, row in enumerate(counts):
            top = np.argsort(-row, kind="stable")[:5]
            listed = " ".join(f"{c}:{row[c]}" for c in top if row[c])
            lines.append(f"{i:>6} {sizes[i]:>6} {int((row > 0).sum()):>7}  {listed}")
        lines.append(f"{'all':>6} {sizes.sum():>6} {counts.shape[1]:>7}")
        return "\n".join(lines)
    width = len(str(int(counts.sum(axis=0).max()))) + 1  # column totals are the widest numbers
    header = f"{'client':>6}" + "".join(f"{c:>{width}}" for c in range(counts.shape[1])) + f"{'total':>7}"
    lines = [header]
    for i, row in enumerate(counts):
        lines.append(f"{i:>6}" + "".join(f"{v:>{width}}" for v in row) + f"{sizes[i]:>7}")
    lines.append(f"{'all':>6}" + "".join(f"{v:>{width}}" for v in counts.sum(axis=0)) + f"{sizes.sum():>7}")
    if any(name != str(i) for i, name in enumerate(classes)):
        lines.append("classes: " + ", ".join(f"{i}={name}" for i, name in enumerate(classes)))
    return "\n".join(lines)


def plot_heatmap(counts: np.ndarray, path: str | Path, title: str) -> None:
    """Save a clients x classes heat map of ``counts`` as an image (format from the suffix)."""
    n, num_classes = counts.shape
    fig = Figure(figsize=(min(2.5 + 0.45 * num_classes, 16.0), min(1.6 + 0.32 * n, 20.0)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="samples", pad=0.01)
    ax.set_xlabel("class")
    ax.set_ylabel("client (total samples)")
    ax.set_title(title, fontsize=10)
    if num_classes <= _WIDE_TABLE_CLASSES:
        ax.set_xticks(range(num_classes))
    if n <= 50:
        sizes = counts.sum(axis=1)
        ax.set_yticks(range(n), [f"{i} ({sizes[i]})" for i in range(n)])
    if n * num_classes <= _ANNOTATE_CELLS:
        threshold = counts.max() / 2
        for (i, j), value in np.ndenumerate(counts):
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                        color="black" if value > threshold else "white")
    fig.savefig(path, dpi=120)


def write_assignment(
    path: str | Path,
    *,
    dataset: str,
    scheme: str,
    params: dict[str, Any],
    seed: int,
    classes: Sequence[str],
    parts: Sequence[np.ndarray],
    counts: np.ndarray,
) -> None:
    """Write the partition as JSON: what produced it, the summary, and each client's indices."""
    header = {
        "dataset": dataset,
        "split": "train",
        "scheme": scheme,
        "params": params,
        "seed": seed,
        "num_clients": len(parts),
        "classes": list(classes),
        "summary": noniid_summary(counts),
    }
    clients = [
        {"id": i, "count": len(p), "label_counts": counts[i].tolist(), "indices": p.tolist()}
        for i, p in enumerate(parts)
    ]
    # One line per field and per client: diffable and greppable, where indent= would put every
    # index on its own line.
    fields = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in header.items()]
    rows = ",\n".join(f"  {json.dumps(client)}" for client in clients)
    Path(path).write_text("{\n" + ",\n".join(fields) + ',\n "clients": [\n' + rows + "\n ]\n}\n")
