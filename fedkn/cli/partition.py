"""``fedkn partition``: show how a dataset would be split among clients, before training on it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fedkn.data.datasets import DATASETS, load_dataset
from fedkn.data.partition import SCHEMES, format_partition, parse_partition, partition, resolve_params
from fedkn.errors import FedknError

_EXAMPLES = """\
examples:
  fedkn partition                                   # digits, 10 clients, IID
  fedkn partition --partition dir0.3                # Dirichlet label skew, alpha 0.3
  fedkn partition --partition 2cls --num-clients 20 # 2 classes per client (shards)
  fedkn partition --scheme classes-balance --classes-per-client 2 --balance 0.2
  fedkn partition --dataset fmnist --partition quantity:alpha=0.5 --num-clients 100
  fedkn partition --dataset cifar10 --data-dir ~/data --partition dir0.1 --out runs/cifar-dir0.1

partition specs: SCHEME[:key=value,...] with SCHEME one of {},
or an alias: dir0.3 = dirichlet:alpha=0.3, 2cls = shards2 = shards:classes_per_client=2.
Outputs: a clients x classes table and a non-IID summary on stdout, and partition.json (scheme, params, seed, per-client
indices and label counts) plus partition.png (clients x classes heat map) in --out.
""".format(", ".join(SCHEMES))

#: Flags that each set the partition parameter of the same name (argparse dest = parameter name).
_PARAM_FLAGS: tuple[str, ...] = ("alpha", "classes_per_client", "balance", "min_samples")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "partition",
        help="show and save how a dataset is split among federated clients",
        description="Partition a dataset's train split among clients and report per-client label\n"
        "counts, a non-IID score, a heat map and the exact assignment. Training with the same\n"
        "dataset, number of clients, partition and seed uses the same split.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", default="digits", choices=DATASETS, help="dataset (default: digits, embedded)")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="directory with the dataset files (not needed for digits; fmnist defaults to the Debian package)",
    )
    parser.add_argument("--num-clients", type=int, default=10, metavar="N", help="number of clients (default: 10)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--partition", metavar="SPEC", help="one-token partition spec, e.g. iid, dir0.3, 2cls (default: iid)"
    )
    how.add_argument("--scheme", choices=SCHEMES, help="partition scheme, with its parameters from the flags below")
    parser.add_argument(
        "--alpha", type=float, metavar="A",
        help="Dirichlet concentration for dirichlet/quantity (smaller = more skewed)",
    )
    parser.add_argument(
        "--classes-per-client", type=int, metavar="K", help="classes per client for shards/classes-balance"
    )
    parser.add_argument(
        "--balance", type=float, metavar="B", help="classes-balance size balance in [0, 1] (1 = equal sizes)"
    )
    parser.add_argument(
        "--min-samples", type=int, metavar="M", help="minimum samples per client for dirichlet/quantity"
    )
    parser.add_argument("--seed", type=int, default=0, help="partition seed (default: 0)")
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="output directory (default: runs/partition-DATASET-SCHEME-TIMESTAMP)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedkn.data import report  # matplotlib is only needed here, once the input is valid

    if args.scheme is not None:
        scheme, params = args.scheme, {}
    else:
        scheme, params = parse_partition(args.partition or "iid")
    params.update({name: getattr(args, name) for name in _PARAM_FLAGS if getattr(args, name) is not None})
    params = resolve_params(scheme, params)

    dataset = load_dataset(args.dataset, "train", args.data_dir)
    labels = dataset.labels.numpy()
    parts = partition(labels, args.num_clients, scheme, args.seed, **params)
    counts = report.label_counts(labels, parts, dataset.num_classes)
    summary = report.noniid_summary(counts)
    spec = format_partition(scheme, params)

    print(f"{dataset.name} train split: {len(dataset)} samples, {dataset.num_classes} classes -> "
          f"{len(parts)} clients, {spec}, seed {args.seed}")
    print(report.format_table(counts, dataset.classes))
    print(report.format_summary(summary))

    out = args.out or Path("runs") / f"partition-{dataset.name}-{scheme}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedknError(f"cannot create output directory {out} ({err.strerror}); pass a writable --out.") from None
    json_path, png_path = out / "partition.json", out / "partition.png"
    report.write_assignment(
        json_path, dataset=dataset.name, scheme=scheme, params=params, seed=args.seed,
        classes=dataset.classes, parts=parts, counts=counts,
    )
    title = f"{dataset.name}: {spec}, {len(parts)} clients, seed {args.seed} (mean TV {summary['mean_tv']:.2f})"
    report.plot_heatmap(counts, png_path, title)
    print(f"wrote {json_path} and {png_path}")
    return 0
