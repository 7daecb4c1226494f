"""Local-training throughput per normalization layer: samples/s of ``fedkn.train.train_local``.

The model (ResNet-8 width 0.25 by default) is trained on the embedded digits data (16x16, 1 channel)
with the exact function a fedkn client runs, fed by the same preprocessing (raw pixels for
KernelNorm, mean/std-normalized for the others). Each measurement is one ``train_local`` call of
``--steps`` SGD steps (optimizer creation and batching included); the table shows the median over
``--repeats``, with norms visited in a rotated order every repeat so background load spreads
evenly, and each norm's ratio to BatchNorm (> 1: faster than bn). torch runs with ``--threads``
threads (default 1, what each Ray ClientApp actor gets with client-num-cpus 1).

    python benchmarks/throughput.py                  # batch 8 and 32, 30 steps, 5 repeats
    python benchmarks/throughput.py --quick          # smoke run: 2 steps, 1 repeat
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

NORMS = ("kn", "bn", "gn", "ln", "wsgn", "none")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--norms", default=",".join(NORMS), help=f"comma-separated (default {','.join(NORMS)})")
    parser.add_argument("--batches", default="8,32", help="comma-separated batch sizes (default 8,32)")
    parser.add_argument("--steps", type=int, default=30, help="SGD steps per timed train_local call (default 30)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per (norm, batch); median shown (default 5)")
    parser.add_argument("--samples", type=int, default=512, help="size of the client's index set (default 512)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 2, 1

    import torch

    before = torch.get_num_threads()
    try:
        return run(args, parser)
    finally:
        torch.set_num_threads(before)  # callers in the same process (the smoke test) keep theirs


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import numpy as np
    import torch

    from fedkn.data import load_dataset, preprocess_for
    from fedkn.models import build
    from fedkn.nn.norms import NORMS as SPECS
    from fedkn.train import default_device, train_local

    if args.threads:
        torch.set_num_threads(args.threads)
    norms = [n.strip() for n in args.norms.split(",") if n.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    unknown = [n for n in norms if n not in SPECS]
    if unknown:
        parser.error(f"unknown norm(s) {unknown}; choose from {', '.join(SPECS)}")
    dataset = load_dataset("digits", "train")
    indices = np.arange(min(args.samples, len(dataset)))
    device = default_device()
    models, pre = {}, {}
    for norm in norms:
        torch.manual_seed(0)
        models[norm] = build(args.model, norm, num_classes=dataset.num_classes, in_channels=dataset.in_channels,
                             width=args.width, image_size=dataset.image_size)
        pre[norm] = preprocess_for(dataset, normalize=not SPECS[norm].raw_pixels, augment=False)

    def one(norm: str, batch: int) -> float:
        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        res = train_local(models[norm], dataset, indices, batch_size=batch, lr=0.01, steps=args.steps,
                          generator=generator, device=device, preprocess=pre[norm])
        elapsed = time.perf_counter() - t0
        assert res.steps == args.steps
        return args.steps * batch / elapsed

    print(f"{args.model} x{args.width:g} on digits {dataset.image_size[0]}x{dataset.image_size[1]}, device={device}, "
          f"torch threads {torch.get_num_threads()}; {args.steps} steps per call, median of {args.repeats} "
          f"(norm order rotates per repeat)")
    for norm in norms:  # warm-up: first-call allocations and kernel selection
        for batch in batches:
            one(norm, batch)
    samples: dict[tuple[str, int], list[float]] = {(n, b): [] for n in norms for b in batches}
    for r in range(args.repeats):
        order = norms[r % len(norms):] + norms[: r % len(norms)]
        for batch in batches:
            for norm in order:
                samples[(norm, batch)].append(one(norm, batch))
    rate = {k: statistics.median(v) for k, v in samples.items()}

    header = f"{'norm':6}" + "".join(f" {f'b{b} samples/s':>15} {f'b{b} vs bn':>9}" for b in batches)
    print(header)
    print("-" * len(header))
    for norm in norms:
        cells = ""
        for b in batches:
            ref = rate.get(("bn", b))
            ratio = f"{rate[(norm, b)] / ref:9.2f}" if ref else f"{'n/a':>9}"
            cells += f" {rate[(norm, b)]:15.0f} {ratio}"
        print(f"{norm:6}{cells}")
    print("-" * len(header))
    for b in batches:
        if ("bn", b) in rate:
            line = ", ".join(f"{n} {rate[(n, b)] / rate[('bn', b)]:.2f}" for n in norms)
            print(f"ratio vs bn, batch {b}: {line}")
    print("(no target: issue 5 asks for the numbers; > 1 means faster than bn)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
