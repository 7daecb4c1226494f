"""``fedkn report DIR``: rebuild a comparison's report from its finished runs."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="rebuild report.md, final_metrics.csv and plots of a `fedkn compare` output directory",
        description=(
            "Rebuild DIR/report.md, DIR/final_metrics.csv, DIR/tuning.json and the plots from the run\n"
            "directories under DIR/runs/ (config.toml, metrics.csv, summary.json) and the tuning scores\n"
            "under DIR/tune/*/val_score.json. Unfinished runs are listed but left out of the tables."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="a `fedkn compare` output directory (its --out)")
    p.add_argument("--target", type=float, default=None, metavar="ACC",
                   help="accuracy for the 'rounds to target' column (default: the one fedkn compare used, else 0.8)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    from fedkn.compare.report import build_report

    path = build_report(args.dir, target=args.target, plots=not args.no_plots, require_finished=True)
    print(f"report: {path}")
    return 0
