"""KernelNorm layers (Nasirigerdeh et al., TMLR 2024); ``docs/kernelnorm.md`` states the method.

A *unit* is one sliding window of the zero-padded input over all channels. KernelNorm standardizes
each unit by its own mean and biased variance, so a sample is normalized by its own values only:
the layers are batch independent (tiny batches, non-IID clients, DP-SGD's per-sample gradients).

:class:`KNConv2d` is KernelNorm followed by a convolution with stride = kernel over the units,
computed without building the units (:func:`kn_conv2d_reference` is the whole method)::

    out[o] = (conv(x_pad)[o] - mu * sum(w[o])) / sqrt(var + eps) + b[o]

``impl`` picks how it is computed: ``"reference"`` (plain autograd ops, any device, differentiable
by every torch transform), ``"fused"`` (:mod:`fedkn.nn.kn_cpu`: the statistics and the
standardization in two compiled CPU loops), or ``"auto"`` (default: fused where it can run, else
the reference). Both give the same numbers to rounding, with the same dropout draws
(tests/test_kernelnorm.py holds them equal in float64, gradients included).

Neither class subclasses :class:`torch.nn.Conv2d`: Opacus picks per-sample-gradient rules by module
type, and a KNConv2d that passed for a plain convolution would get wrong per-sample gradients.
Deliberate difference from the authors' code: their statistics dropout also runs in eval mode; here
eval mode has no dropout, so evaluation is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkn.errors import FedknError
from fedkn.nn import kn_cpu

Padding = int | tuple[int, int] | tuple[int, int, int, int]
Impl = Literal["auto", "reference", "fused"]
IMPLS: tuple[str, ...] = ("auto", "reference", "fused")


def _pair(value: int | tuple[int, int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(v < 1 for v in pair):
        raise ValueError(f"{what} must be a positive int or a pair of positive ints, got {value!r}")
    return pair[0], pair[1]


def _padding4(padding: Padding) -> tuple[int, int, int, int]:
    """Normalize padding to F.pad's (left, right, top, bottom) order.

    An int pads all sides; a pair is (vertical, horizontal) like ``nn.Conv2d``; a 4-tuple is
    (left, right, top, bottom) as in the paper's asymmetric transition layers.
    """
    if isinstance(padding, int):
        pad = (padding,) * 4
    elif len(padding) == 2:
        pad = (padding[1], padding[1], padding[0], padding[0])
    elif len(padding) == 4:
        pad = tuple(padding)
    else:
        raise ValueError(f"padding must be an int, a pair or (left, right, top, bottom), got {padding!r}")
    if any(p < 0 for p in pad):
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return pad[0], pad[1], pad[2], pad[3]


def _check_dropout(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return float(p)


def draw_dropped(numel: int, p: float, device: torch.device | str | None = None) -> Tensor:
    """Flat indices of the elements that a Bernoulli(``p``) dropout mask over ``numel`` elements drops.

    Returns int64 indices in increasing order, of a length fixed by ``numel`` and ``p``: the
    entries at ``numel`` or beyond (the tail) are no drops, callers discard them. The fixed length
    keeps the computation free of data-dependent shapes and host syncs.

    Why not a dense mask: the gaps between successive drops of iid Bernoulli(p) trials are iid
    Geometric(p), so the drop positions are the running sums of ``numel * p`` (plus a margin)
    geometric draws: exactly the distribution of a dense mask, at ~``p`` of its random numbers. A
    gap is drawn by inversion, ``1 + floor(log(1 - u) / log(1 - p))`` with ``u`` uniform in [0, 1)
    (float64, so the tail is cut only where its probability is below 2**-53). The margin is 10
    standard deviations plus 32 draws, so the chance that the draws end before ``numel`` (leaving
    the tail undropped) is below 1e-20 per call.
    """
    expected = numel * p
    draws = int(expected + 10.0 * math.sqrt(expected) + 32)
    u = torch.empty(draws, dtype=torch.float64, device=device).uniform_()
    gaps = u.neg_().log1p_().mul_(1.0 / math.log1p(-p)).to(torch.int64).add_(1)  # to(int64) floors: >= 0
    gaps[:1].sub_(1)  # so that the running sum is the 0-based index
    return gaps.cumsum_(0)


def draw_statistics_dropout(x: Tensor, p: float, training: bool) -> Tensor | None:
    """The drops (:func:`draw_dropped` over ``x``'s elements) of one forward pass; None when there are none.

    Every KNConv2d forward calls this first, whatever its ``impl``, so the draw is the layer's
    first random operation with the default generator: replaying the random state reproduces it
    (``fedkn.privacy`` does, for per-sample gradients). The padding is never drawn over: a dropped
    zero changes no statistic.
    """
    return draw_dropped(x.numel(), p, x.device) if training and p > 0 and x.numel() else None


def dropped_out(x: Tensor, dropped: Tensor | None, p: float) -> Tensor:
    """``x`` with the ``dropped`` elements zeroed and the rest scaled by 1/(1-p): what the statistics see."""
    if dropped is None:
        return x
    keep = x.new_ones(x.numel() + 1)  # the extra element absorbs draw_dropped's tail
    keep[dropped.clamp_max(x.numel())] = 0.0
    return x * keep[:-1].view_as(x) / (1.0 - p)


def unit_moments(
    x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int, int, int]
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of every unit of ``x`` zero-padded by ``padding``: (N, 1, H_out, W_out) each.

    Every position holds C values, so window-averaging the per-position channel means (zeros of the
    padding included) gives the mean over a unit's C*kh*kw values; likewise the mean square, and
    ``var = E[x^2] - E[x]^2``, clamped at 0 against rounding.
    """
    mean, mean_sq = (F.avg_pool2d(F.pad(t.mean(1, keepdim=True), padding), kernel_size, stride) for t in (x, x * x))
    return mean, (mean_sq - mean * mean).clamp_min(0.0)


@dataclass(frozen=True)
class UnitGeometry:
    """Where a KNConv2d's units lie and how they are standardized: the window (``kernel_size``), its
    step (``stride``), the zero padding of the input (left, right, top, bottom), the convolution's
    ``groups`` and the variance's ``eps``."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    groups: int
    eps: float


def kn_conv2d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    units: UnitGeometry,
    dropped: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """KernelNorm2d(kernel_size, stride, padding) then Conv2d(kernel_size, stride=kernel_size), in plain ops.

    The spec's identity: for a unit with statistics ``mu``/``var`` and output channel ``o``,
    ``conv(U_hat)[o] = (conv(x_pad)[o] - mu * sum(w[o])) / sqrt(var + eps) + b[o]``. The statistics
    come from the dropped-out input (training mode), the convolution from the original one.
    Autograd differentiates through the statistics too.
    """
    mean, var = unit_moments(dropped_out(x, dropped, dropout_p), units.kernel_size, units.stride, units.padding)
    conv = F.conv2d(F.pad(x, units.padding), weight, None, units.stride, groups=units.groups)
    out = (conv - mean * weight.sum(dim=(1, 2, 3)).view(1, -1, 1, 1)) * torch.rsqrt(var + units.eps)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


@torch.no_grad()
def unit_statistics(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dropout_p: float,
    training: bool,
) -> tuple[Tensor, Tensor]:
    """The unit mean and variance a KNConv2d forward pass over ``x`` uses, drawing its dropout as it does.

    Not differentiable; for callers that need the statistics alone (per-sample gradient rules).
    """
    dropped = draw_statistics_dropout(x, dropout_p, training)
    return unit_moments(dropped_out(x, dropped, dropout_p), kernel_size, stride, padding)


def _is_plain(x: Tensor) -> bool:
    """False for tensors without memory of their own (torch.func's batched tensors, fake tensors)."""
    try:
        x.data_ptr()
    except RuntimeError:
        return False
    return True


class KernelNorm2d(nn.Module):
    """Normalizes every unit of the input by its own statistics; no parameters, no running stats.

    Output layout is the spec's: units side by side, shape ``(N, C, kh*H_out, kw*W_out)``, so that a
    convolution with kernel ``k`` and stride ``k`` sees one unit per output position. With overlapping
    windows (``stride < kernel_size``) the output is necessarily ``kh*kw/(sh*sw)`` times the input;
    use :class:`KNConv2d` when a convolution follows, which never builds this tensor.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int] = 1,
        stride: int | tuple[int, int] | None = None,
        padding: Padding = 0,
        dropout_p: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride")
        self.padding = _padding4(padding)
        self.dropout_p = _check_dropout(dropout_p)
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        x_pad = F.pad(x, self.padding)
        n, c, h, w = x_pad.shape
        kh, kw = self.kernel_size
        if (kh, kw) == (1, 1) and self.stride == (1, 1):
            # Per-position normalization across channels: no unit layout needed.
            src = F.dropout(x_pad, self.dropout_p, training=True) if self.training and self.dropout_p > 0 else x_pad
            var, mean = torch.var_mean(src, dim=1, keepdim=True, correction=0)
            return (x_pad - mean) * torch.rsqrt(var + self.eps)
        units = F.unfold(x_pad, self.kernel_size, stride=self.stride)  # (N, C*kh*kw, L)
        src = F.dropout(units, self.dropout_p, training=True) if self.training and self.dropout_p > 0 else units
        var, mean = torch.var_mean(src, dim=1, keepdim=True, correction=0)
        units = (units - mean) * torch.rsqrt(var + self.eps)
        h_out = (h - kh) // self.stride[0] + 1
        w_out = (w - kw) // self.stride[1] + 1
        # (N, C, kh, kw, H_out, W_out) -> (N, C, H_out, kh, W_out, kw) -> (N, C, kh*H_out, kw*W_out)
        units = units.view(n, c, kh, kw, h_out, w_out).permute(0, 1, 4, 2, 5, 3)
        return units.reshape(n, c, h_out * kh, w_out * kw)

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dropout_p={self.dropout_p}, eps={self.eps}"
        )


class KNConv2d(nn.Module):
    """KernelNorm2d(k, s, p, dropout_p) followed by Conv2d(k, stride=k), computed without unfolding.

    Parameters mirror :class:`torch.nn.Conv2d` (``weight`` of shape (out, in/groups, kh, kw) and
    ``bias``) so that optimizers, state dicts and FedAvg treat it like any convolution; the module is
    deliberately *not* a Conv2d subclass (see the module docstring). The 1x1 form (k=1, s=1, p=0) is
    per-position normalization across channels followed by a 1x1 convolution.

    ``impl``: ``"auto"`` (the fused CPU kernels of :mod:`fedkn.nn.kn_cpu` for CPU float32/float64
    tensors when they are built, the reference otherwise: on other devices, under ``torch.compile``,
    ``torch.jit.trace`` or ``torch.func`` transforms), ``"reference"`` (always
    :func:`kn_conv2d_reference`) or ``"fused"`` (the kernels or an error).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: Padding = 0,
        bias: bool = True,
        groups: int = 1,
        dropout_p: float = 0.0,
        eps: float = 1e-5,
        impl: Impl = "auto",
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _padding4(padding)
        self.groups = groups
        self.dropout_p = _check_dropout(dropout_p)
        self.eps = float(eps)
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, relu) weights and zero bias, the KNResNet initialization."""
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        fused = self._fused(x)
        dropped = draw_statistics_dropout(x, self.dropout_p, self.training)
        units = UnitGeometry(self.kernel_size, self.stride, self.padding, self.groups, self.eps)
        args = (x, self.weight, self.bias, units, dropped, self.dropout_p)
        return kn_cpu.kn_conv2d(*args) if fused else kn_conv2d_reference(*args)

    def _fused(self, x: Tensor) -> bool:
        """Whether this call runs the fused kernels (see ``impl`` in the class docstring)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            why = "inside torch.compile or torch.jit.trace"
        elif not _is_plain(x):
            if self.training and self.dropout_p > 0:
                raise FedknError(
                    "KNConv2d's statistics dropout cannot run inside torch.func transforms (Opacus' functorch "
                    "path would redraw its masks); use fedkn.privacy.attach(model) for per-sample gradients, "
                    "or dropout_p=0"
                )
            why = "inside a torch.func transform"
        else:
            why = kn_cpu.unsupported(x, self.weight)
        if self.impl == "reference":
            return False
        if why is not None and self.impl == "fused":
            raise FedknError(f"KNConv2d(impl='fused') cannot run here: {why}; use impl='auto' or 'reference'")
        return why is None

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, "
            f"dropout_p={self.dropout_p}, eps={self.eps}, impl={self.impl!r}"
        )
