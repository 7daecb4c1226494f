"""Partition report: non-IID score, text table and heat map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedkn.data import report


def test_noniid_summary_spans_iid_to_disjoint() -> None:
    iid = report.noniid_summary(np.full((4, 5), 10))
    assert iid["mean_tv"] == 0.0 and iid["mean_classes"] == 5 and iid["min_size"] == iid["max_size"] == 50
    disjoint = report.noniid_summary(np.eye(4, dtype=np.int64) * 7)
    assert disjoint["mean_tv"] == 0.75 and disjoint["mean_classes"] == 1  # 1 - 1/4 classes
    assert "mean TV distance to the global label mix 0.750" in report.format_summary(disjoint)


def test_table_lists_counts_totals_and_class_names() -> None:
    counts = np.array([[3, 0, 1], [0, 12, 0]])
    lines = report.format_table(counts, ("cat", "dog", "eel")).splitlines()
    assert lines[0].split() == ["client", "0", "1", "2", "total"]
    assert lines[1].split() == ["0", "3", "0", "1", "4"] and lines[3].split() == ["all", "3", "12", "1", "16"]
    assert lines[-1] == "classes: 0=cat, 1=dog, 2=eel"
    wide_totals = report.format_table(np.array([[999, 5], [999, 5]]), ("0", "1")).splitlines()
    assert wide_totals[-1].split() == ["all", "1998", "10", "2008"]


def test_wide_table_and_heatmap_for_many_classes(tmp_path: Path) -> None:
    counts = np.random.default_rng(0).integers(0, 5, (3, 100))
    lines = report.format_table(counts, tuple(map(str, range(100)))).splitlines()
    assert "top classes" in lines[0] and len(lines) == 5
    report.plot_heatmap(counts, tmp_path / "wide.png", "wide")
    assert (tmp_path / "wide.png").stat().st_size > 1000
