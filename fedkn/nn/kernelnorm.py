"""KernelNorm layers (Nasirigerdeh et al., TMLR 2024), as stated in ``docs/kernelnorm.md``.

A *unit* is one sliding window of the zero-padded input over all channels. KernelNorm standardizes
each unit by its own mean and (biased) variance, so a sample is normalized by its own values only:
the layers here are batch independent, which is what makes them usable with tiny batches, non-IID
clients and DP-SGD's per-sample gradients.

:class:`KNConv2d` never materializes the units. For a window with statistics ``mu``/``var`` and
output channel ``o`` with weights ``w[o]``::

    conv(U_hat)[o] = (conv(x_pad)[o] - mu * sum(w[o])) / sqrt(var + eps) + b[o]

and ``mu``/``var`` come from average-pooling the channel mean of ``x_pad`` and of ``x_pad**2``. That
costs one convolution plus two cheap poolings, instead of ``kh*kw`` times the input's memory (and
symmetric padding is left to the convolution and pooling, so not even ``x_pad`` is built).

Neither class subclasses :class:`torch.nn.Conv2d`: Opacus picks per-sample-gradient rules by module
type, and a KNConv2d that passed for a plain convolution would get wrong per-sample gradients.

Deliberate difference from the authors' code: their statistics dropout also runs in eval mode; here
eval mode has no dropout, so evaluation is deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Padding = int | tuple[int, int] | tuple[int, int, int, int]


def _pair(value: int | tuple[int, int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(v < 1 for v in pair):
        raise ValueError(f"{what} must be a positive int or a pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


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
    return pad  # type: ignore[return-value]


def _check_dropout(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return float(p)


class _ChannelMoments(torch.autograd.Function):
    """Per-position mean and mean square over channels of ``x * keep * scale``.

    Written as one autograd node so backward is a single fused pass over the input
    (``grad = keep * scale / C * (g_mean + 2 * scale * x * g_sq)``) and only ``x`` (which the
    convolution saves anyway) plus a 1-byte dropout mask are kept, instead of a float dropped-out
    copy and its square. ``generate_vmap_rule`` keeps it usable under ``torch.func`` (Opacus).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, keep: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        # Two plain channel means, not torch.var_mean: on CPU, var_mean over dim 1 of an NCHW
        # tensor is 8-30x slower than mean + mean of the square (it walks the strided channel axis
        # per position), and the caller wants E[x^2] anyway.
        kept = x if keep is None else x * keep
        mean = kept.mean(dim=1, keepdim=True)
        mean_sq = (kept * x).mean(dim=1, keepdim=True)  # keep is 0/1, so keep * x^2 = kept * x
        if keep is None:
            return mean, mean_sq
        return mean * scale, mean_sq * (scale * scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, keep, scale = inputs
        ctx.save_for_backward(x, keep)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, g_mean: Tensor, g_sq: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        x, keep = ctx.saved_tensors
        channels = x.shape[1]
        if keep is None:
            return torch.addcmul(g_mean, x, g_sq, value=2.0) / channels, None, None
        s = ctx.scale
        return torch.addcmul(g_mean, x, g_sq, value=2.0 * s).mul_(keep).mul_(s / channels), None, None


class _Standardize(torch.autograd.Function):
    """``(y - mean * weight_sum) * rstd + bias``: the right-hand side of the KNConv2d identity.

    Autograd on the plain expression keeps several full-size temporaries and runs one elementwise
    pass per operator; here backward needs one product (``g * rstd``) and three contractions, which
    roughly halves the non-convolution time of a KNConv2d. ``bias`` may be None.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(y: Tensor, mean: Tensor, rstd: Tensor, weight_sum: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        # Three in-place passes over the output instead of four allocating ones.
        out = torch.addcmul(y, mean, weight_sum.view(1, -1, 1, 1), value=-1.0).mul_(rstd)
        return out if bias is None else out.add_(bias.view(1, -1, 1, 1))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        y, mean, rstd, weight_sum, bias = inputs
        ctx.save_for_backward(y, mean, rstd, weight_sum)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        y, mean, rstd, weight_sum = ctx.saved_tensors
        n, o, h, w = g.shape
        g_flat = g.reshape(n, o, h * w)
        # Contractions over output channels / positions as matrix products (no full-size temporaries).
        g_ws = torch.matmul(weight_sum, g_flat).view(n, 1, h, w)  # sum_o g * weight_sum[o]
        grad_weight_sum = -torch.bmm(g_flat, (rstd * mean).reshape(n, h * w, 1)).sum(dim=(0, 2))
        grad_rstd = (g * y).sum(dim=1, keepdim=True) - mean * g_ws
        grad_bias = g.sum(dim=(0, 2, 3)) if ctx.has_bias else None
        return g * rstd, -rstd * g_ws, grad_rstd, grad_weight_sum, grad_bias


def split_padding(
    x: Tensor, padding: tuple[int, int, int, int], kernel_size: tuple[int, int]
) -> tuple[Tensor, tuple[int, int]]:
    """``(source, (pad_h, pad_w))``: the tensor to convolve/pool and the padding left to the op.

    Symmetric padding of at most half the kernel is left to ``conv2d``/``avg_pool2d`` (with
    ``count_include_pad``, which averages the zeros exactly as a zero-padded unit holds them), so
    no padded copy of the input is made; any other padding is applied here with ``F.pad``.
    """
    left, right, top, bottom = padding
    if left == right and top == bottom and 2 * left <= kernel_size[1] and 2 * top <= kernel_size[0]:
        return x, (top, left)
    return F.pad(x, padding), (0, 0)


def unit_statistics(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dropout_p: float,
    training: bool,
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of every unit of ``x`` zero-padded by ``padding``, shape (N, 1, H_out, W_out).

    Average-pooling the per-position channel mean gives the mean over all ``C*kh*kw`` values of a
    window (every position holds C values, so the two-stage average is exact); likewise for the mean
    square, and ``var = E[x^2] - E[x]^2``. In training mode the statistics come from a dropped-out
    copy (a regularizer); the caller keeps using the original input for the convolution. The
    dropout mask is drawn over :func:`split_padding`'s source, so replaying the random state
    (``fedkn.privacy``) reproduces it.
    """
    src, pool_pad = split_padding(x, padding, kernel_size)
    return _source_statistics(src, pool_pad, kernel_size, stride, dropout_p, training)


def _source_statistics(
    src: Tensor, pool_pad: tuple[int, int], kernel_size: tuple[int, int], stride: tuple[int, int],
    dropout_p: float, training: bool,
) -> tuple[Tensor, Tensor]:
    """:func:`unit_statistics` on :func:`split_padding`'s output (KNConv2d reuses it for the conv)."""
    keep, scale = None, 1.0
    if training and dropout_p > 0:
        keep = torch.rand_like(src) >= dropout_p  # P(keep) = 1 - p; faster than bernoulli_ on CPU
        scale = 1.0 / (1.0 - dropout_p)
    moment1, moment2 = _ChannelMoments.apply(src, keep, scale)
    mean = F.avg_pool2d(moment1, kernel_size, stride, pool_pad, count_include_pad=True)
    mean_sq = F.avg_pool2d(moment2, kernel_size, stride, pool_pad, count_include_pad=True)
    return mean, (mean_sq - mean.square()).clamp_min(0.0)


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
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _padding4(padding)
        self.groups = groups
        self.dropout_p = _check_dropout(dropout_p)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, relu) weights and zero bias, the KNResNet initialization."""
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        src, conv_pad = split_padding(x, self.padding, self.kernel_size)  # padded at most once
        mean, var = _source_statistics(src, conv_pad, self.kernel_size, self.stride, self.dropout_p, self.training)
        out = F.conv2d(src, self.weight, None, self.stride, conv_pad, 1, self.groups)
        return _Standardize.apply(out, mean, torch.rsqrt(var + self.eps), self.weight.sum(dim=(1, 2, 3)), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, "
            f"dropout_p={self.dropout_p}, eps={self.eps}"
        )

