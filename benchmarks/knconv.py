"""KNConv2d speed and memory against the unfold formulation and Conv2d+BatchNorm2d, in one run.

For every distinct convolution shape of KNResNet-18 (32x32 inputs, batch 32 by default) it times a
forward+backward pass of

- ``KNConv2d`` (pooled statistics, units never materialized),
- the unfold formulation (``KernelNorm2d`` laying out every unit, then a kernel-k stride-k conv),
- ``Conv2d`` followed by ``BatchNorm2d`` on the same padded input (the layer KN replaces),
- a bare ``Conv2d`` padded as KNConv2d pads, over the whole batch (the convolution KNConv2d runs),

and prints ratios, plus the same for one whole training step of KNResNet-18 vs ResNet-18-BN.
Backward starts from ``out.sum()`` (a stride-0 gradient) by default; ``--grad dense`` backpropagates
a fixed random gradient instead, which is what a layer receives inside a network.

``--impl`` picks KNConv2d's implementation (``auto``, the default that fedkn trains with, runs
the fused CPU kernels of ``fedkn/nn/kn_cpu.py`` on a CPU; ``reference`` the plain-autograd form).
The whole-model line puts each model's forward+backward FLOPs (convolutions and matmuls, counted by
``torch.utils.flop_counter``) beside its time: KNResNet-18 is a wider network than ResNet-18, so
the time ratio mixes architecture and KernelNorm's own cost; ``ms per GFLOP`` separates them.

Memory: on CUDA, peak allocated bytes; on CPU (no allocator statistics), the bytes of the tensors
autograd saves for backward plus the output, deduplicated by storage, which is what dominates the
training-time peak. Targets: KNConv2d >= 5x faster than unfold (issue 2), <= 1.0x Conv2d+BN time
on CPU and <= 1.3x on CUDA (issue 15), <= 1.5x Conv2d+BN memory (issue 2).

    python benchmarks/knconv.py              # full table
    python benchmarks/knconv.py --grad dense # same, dense upstream gradients
    python benchmarks/knconv.py --impl reference # KNConv2d's plain-autograd reference
    python benchmarks/knconv.py --quick      # smoke run: batch 4, 1 repeat
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fedkn.models import build
from fedkn.nn import IMPLS, KernelNorm2d, KNConv2d

# (in, out, kernel, padding (left, right, top, bottom), input size) of KNResNet-18's convolutions.
SHAPES = [
    (3, 64, 3, (1, 1, 1, 1), 32),
    (64, 256, 2, (1, 1, 1, 1), 32),
    (256, 64, 2, (0, 0, 0, 0), 33),
    (64, 256, 2, (1, 0, 1, 0), 32),
    (256, 256, 2, (1, 1, 1, 1), 16),
    (256, 256, 2, (0, 0, 0, 0), 17),
    (256, 512, 2, (0, 1, 0, 1), 16),
    (512, 512, 2, (1, 1, 1, 1), 8),
    (512, 512, 2, (0, 0, 0, 0), 9),
    (512, 724, 2, (1, 0, 1, 0), 8),
    (724, 724, 2, (1, 1, 1, 1), 4),
    (724, 724, 2, (0, 0, 0, 0), 5),
    (724, 512, 2, (1, 1, 1, 1), 2),
]


class UnfoldKNConv(nn.Module):
    """The reference formulation: lay out all units (kh*kw times the input), then conv k, stride k."""

    def __init__(self, cin: int, cout: int, k: int, pad: tuple[int, int, int, int], dropout_p: float) -> None:
        super().__init__()
        self.norm = KernelNorm2d(k, 1, pad, dropout_p)
        self.conv = nn.Conv2d(cin, cout, k, stride=k)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.norm(x))


class PadConvBN(nn.Module):
    """Conv2d + BatchNorm2d on the same (possibly asymmetrically) padded input as the KN layers."""

    def __init__(self, cin: int, cout: int, k: int, pad: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv2d(cin, cout, k, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(F.pad(x, self.pad)))


class BareConv(nn.Module):
    """Conv2d (with bias) on the input padded exactly as KNConv2d pads it, over the whole batch.

    It is the convolution inside KNConv2d: what KNConv2d costs beyond it is KernelNorm's own work.
    """

    def __init__(self, cin: int, cout: int, k: int, pad: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv2d(cin, cout, k)

    def forward(self, x: Tensor) -> Tensor:
        left, right, top, bottom = self.pad
        if left == right and top == bottom:
            return F.conv2d(x, self.conv.weight, self.conv.bias, 1, (top, left))
        return self.conv(F.pad(x, self.pad))


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes autograd keeps for backward plus the output, counting each storage once."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    seen[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    return sum(seen.values())


def measure(module: nn.Module, x: Tensor, repeats: int, device: torch.device, dense: bool = False) -> tuple[float, int]:
    """Median seconds of forward+backward, and peak memory (CUDA) or saved bytes (CPU).

    ``dense``: backpropagate a fixed random gradient (drawn once, outside the timing) instead of
    ``out.sum()``'s stride-0 one.
    """
    module.to(device).train()
    x = x.to(device).requires_grad_()
    grads: dict[torch.Size, Tensor] = {}

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        if dense:
            if out.shape not in grads:
                grads[out.shape] = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(0))
            out.backward(grads[out.shape])
        else:
            out.sum().backward()

    step()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        memory = torch.cuda.max_memory_allocated() - base
    else:
        memory = saved_bytes(lambda: module(x))
    return statistics.median(times), memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="batch 4, 1 repeat, first 3 shapes, width-0.25 models")
    parser.add_argument("--dropout", type=float, default=0.05, help="KernelNorm dropout_p (KNResNet-18 default)")
    parser.add_argument("--grad", choices=("sum", "dense"), default="sum",
                        help="upstream gradient: out.sum()'s stride-0 one (default) or a fixed dense random one")
    parser.add_argument("--impl", choices=IMPLS, default="auto", help="KNConv2d implementation (default auto)")
    args = parser.parse_args(argv)
    report(args)
    return 0


def train_flops(model: nn.Module, x: Tensor) -> int:
    """Forward+backward FLOPs of one training step (convolutions and matmuls)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def set_impl(model: nn.Module, impl: str) -> nn.Module:
    for m in model.modules():
        if isinstance(m, KNConv2d):
            m.impl = impl
    return model


def report(args: argparse.Namespace) -> None:
    """Measure and print the table, the whole-model step and the targets."""
    dense = args.grad == "dense"
    batch, repeats, shapes, width = args.batch, args.repeats, SHAPES, 1.0
    if args.quick:
        batch, repeats, shapes, width = 4, 1, SHAPES[:3], 0.25
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mem_label = "peak MiB" if device.type == "cuda" else "saved MiB"
    print(f"device={device} threads={torch.get_num_threads()} batch={batch} repeats={repeats} "
          f"grad={args.grad} KNConv2d impl={args.impl} (median of repeats)")
    header = (
        f"{'shape (in->out k pad @HxW)':34} {'KN ms':>8} {'unfold ms':>10} {'conv+BN ms':>10} {'conv ms':>8} "
        f"{'unfold/KN':>9} {'KN/convBN':>9} {'KN/conv':>7} {'KN ' + mem_label:>13} {'convBN ' + mem_label:>17} "
        f"{'mem KN/convBN':>13}"
    )
    print(header)
    print("-" * len(header))

    def row(label: str, t: dict[str, float]) -> str:
        return (
            f"{label:34} {t['kn'] * 1e3:8.2f} {t['unfold'] * 1e3:10.2f} {t['bn'] * 1e3:10.2f} {t['conv'] * 1e3:8.2f} "
            f"{t['unfold'] / t['kn']:9.2f} {t['kn'] / t['bn']:9.2f} {t['kn'] / t['conv']:7.2f} "
            f"{t['kn_mem'] / 2**20:13.1f} {t['bn_mem'] / 2**20:17.1f} {t['kn_mem'] / t['bn_mem']:13.2f}"
        )

    totals = dict.fromkeys(("kn", "unfold", "bn", "conv", "kn_mem", "bn_mem"), 0.0)
    for cin, cout, k, pad, size in shapes:
        torch.manual_seed(0)
        x = torch.rand(batch, cin, size, size)
        t: dict[str, float] = {}
        t["kn"], t["kn_mem"] = measure(KNConv2d(cin, cout, k, 1, pad, dropout_p=args.dropout, impl=args.impl), x, repeats, device, dense)
        t["unfold"], _ = measure(UnfoldKNConv(cin, cout, k, pad, args.dropout), x, repeats, device, dense)
        t["bn"], t["bn_mem"] = measure(PadConvBN(cin, cout, k, pad), x, repeats, device, dense)
        t["conv"], _ = measure(BareConv(cin, cout, k, pad), x, repeats, device, dense)
        for key, value in t.items():
            totals[key] += value
        print(row(f"{cin}->{cout} k{k} pad{pad} @{size}x{size}", t))
    print("-" * len(header))
    print(row("all shapes (sum)", totals))

    torch.manual_seed(0)
    x = torch.rand(batch, 3, 32, 32)
    kn_model = set_impl(build("knresnet18", "kn", width=width), args.impl)
    bn_model = build("resnet18", "bn", width=width)
    kn_t, kn_m = measure(kn_model, x, repeats, device, dense)
    bn_t, bn_m = measure(bn_model, x, repeats, device, dense)
    kn_f, bn_f = (train_flops(m, x.to(device)) / 1e9 for m in (kn_model, bn_model))
    print(
        f"\nwhole training step (fwd+bwd, width {width}): KNResNet-18 {kn_t * 1e3:.1f} ms, {kn_f:.1f} GFLOP, "
        f"{kn_m / 2**20:.1f} {mem_label}; ResNet-18-BN {bn_t * 1e3:.1f} ms, {bn_f:.1f} GFLOP, {bn_m / 2**20:.1f} "
        f"{mem_label}\n  time ratio KN/BN {kn_t / bn_t:.2f} = FLOP ratio {kn_f / bn_f:.2f} (architecture) x "
        f"{(kn_t / kn_f) / (bn_t / bn_f):.2f} per FLOP (KernelNorm's own cost); ms per GFLOP: KN "
        f"{kn_t * 1e3 / kn_f:.1f}, BN {bn_t * 1e3 / bn_f:.1f}; memory ratio {kn_m / bn_m:.2f}"
    )
    limit = 1.3 if device.type == "cuda" else 1.0
    print(
        "targets: unfold/KN >= 5 -> {}; KN/convBN time <= {} ({}) -> {}; KN/convBN memory <= 1.5 -> {}".format(
            "met" if totals["unfold"] / totals["kn"] >= 5 else "NOT met",
            limit, device.type,
            "met" if totals["kn"] / totals["bn"] <= limit else "NOT met",
            "met" if totals["kn_mem"] / totals["bn_mem"] <= 1.5 else "NOT met",
        )
    )
    print(f"bare Conv2d: unfold/conv = {totals['unfold'] / totals['conv']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
