"""Local-training throughput per normalization layer: samples/s of ``fedkn.train.train_local``.

The model (ResNet-8 width 0.25 by default) is trained on Fashion-MNIST (28x28, 1 channel; Debian's
``dataset-fashion-mnist``, else ``--dataset digits``, the embedded 16x16 data) with the exact
function and defaults a fedkn client runs (KNConv2d ``impl="auto"``: the fused CPU kernels), fed by
the same preprocessing (raw pixels for KernelNorm, mean/std-normalized for the others). Each measurement is one ``train_local`` call of
``--steps`` SGD steps (optimizer creation and batching included); the table shows the median over
``--repeats``, with norms visited in a rotated order every repeat so background load spreads
evenly, and each norm's ratio to BatchNorm (> 1: faster than bn). torch runs with ``--threads``
threads (default 1, what each Ray ClientApp actor gets with client-num-cpus 1).

Target (issue 15): kn >= 0.85x bn's samples/s at batch 8 and at batch 16. The fused kernels'
one-time C++ build (cached per machine) is timed too and printed, since it is the path's warm-up.

    python benchmarks/throughput.py                  # fmnist, batch 8, 16 and 32, 30 steps, 5 repeats
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
    parser.add_argument("--dataset", default="fmnist", choices=("fmnist", "digits"),
                        help="fmnist (28x28, default) or the embedded digits (16x16)")
    parser.add_argument("--batches", default="8,16,32", help="comma-separated batch sizes (default 8,16,32)")
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
    from fedkn.errors import FedknError
    from fedkn.models import build
    from fedkn.nn import kn_cpu
    from fedkn.nn.norms import NORMS as SPECS
    from fedkn.train import default_device, train_local

    if args.threads:
        torch.set_num_threads(args.threads)
    norms = [n.strip() for n in args.norms.split(",") if n.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    unknown = [n for n in norms if n not in SPECS]
    if unknown:
        parser.error(f"unknown norm(s) {unknown}; choose from {', '.join(SPECS)}")
    try:
        dataset = load_dataset(args.dataset, "train")
    except FedknError as err:
        parser.error(f"{err} (or pass --dataset digits)")
    print(kernel_build_line(kn_cpu))
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

    print(f"{args.model} x{args.width:g} on {args.dataset} {dataset.image_size[0]}x{dataset.image_size[1]}, device={device}, "
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
    targets = [b for b in (8, 16) if ("kn", b) in rate and ("bn", b) in rate]
    if targets:
        met = all(rate[("kn", b)] / rate[("bn", b)] >= 0.85 for b in targets)
        print(f"target: kn >= 0.85x bn samples/s at batch {' and '.join(map(str, targets))} -> {'met' if met else 'NOT met'}")
    return 0


def kernel_build_line(kn_cpu) -> str:
    """The fused kernels' warm-up: a cold build into a scratch cache, and the load from this machine's cache."""
    import os
    import tempfile
    import time

    before = os.environ.get("FEDKN_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEDKN_CACHE_DIR"] = tmp
        try:
            t0 = time.perf_counter()
            kn_cpu._build()
            cold = time.perf_counter() - t0
        except OSError as err:
            return f"KernelNorm's fused CPU kernels: cold build failed ({err}); kn runs the reference path"
        finally:
            if before is None:
                del os.environ["FEDKN_CACHE_DIR"]
            else:
                os.environ["FEDKN_CACHE_DIR"] = before
    t0 = time.perf_counter()
    kn_cpu.library()
    return (f"KernelNorm's fused CPU kernels: cold build {cold:.2f} s (once per machine, then cached), "
            f"first use in this process {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    sys.exit(main())
