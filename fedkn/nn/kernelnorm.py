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

import inspect
import math

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


def _op_padding(padding: tuple[int, int, int, int], kernel_size: tuple[int, int]) -> tuple[int, int] | None:
    """The (pad_h, pad_w) that ``conv2d``/``avg_pool2d`` can apply themselves, or None when ``F.pad`` must."""
    left, right, top, bottom = padding
    if left == right and top == bottom and 2 * left <= kernel_size[1] and 2 * top <= kernel_size[0]:
        return top, left
    return None


def split_padding(
    x: Tensor, padding: tuple[int, int, int, int], kernel_size: tuple[int, int]
) -> tuple[Tensor, tuple[int, int]]:
    """``(source, (pad_h, pad_w))``: the tensor to convolve/pool and the padding left to the op.

    Symmetric padding of at most half the kernel is left to ``conv2d``/``avg_pool2d`` (with
    ``count_include_pad``, which averages the zeros exactly as a zero-padded unit holds them), so
    no padded copy of the input is made; any other padding is applied here with ``F.pad``.
    """
    pad = _op_padding(padding, kernel_size)
    return (x, pad) if pad is not None else (F.pad(x, padding), (0, 0))


def draw_dropped(numel: int, p: float, device: torch.device | str | None = None) -> Tensor:
    """Flat indices of the elements that a Bernoulli(``p``) dropout mask over ``numel`` elements drops.

    Returns int64 indices in increasing order, of a length fixed by ``numel`` and ``p``: the
    entries at ``numel`` or beyond (the tail) are no drops, callers clamp and discard them. The
    fixed length keeps the computation free of data-dependent shapes and host syncs.

    Why not a dense mask: the gaps between successive drops of iid Bernoulli(p) trials are iid
    Geometric(p), so the drop positions are the running sums of ``numel * p`` (plus a margin)
    geometric draws. That is exactly the distribution of a dense mask, at ~``p`` of its random
    numbers and with no input-sized tensor; on CPU the dense mask (``rand_like`` plus the masked
    copies) cost more than the rest of a KNConv2d. A gap is drawn by inversion,
    ``1 + floor(log(1 - u) / log(1 - p))`` with ``u`` uniform in [0, 1) (float64, so the tail is
    cut only where its probability is below 2**-53): 2.3x faster on CPU than ``geometric_``,
    whose per-element sampler is serial. The margin is 10 standard deviations plus 32 draws, so
    the chance that the draws end before ``numel`` (leaving the tail undropped) is below 1e-20 per
    call.
    """
    expected = numel * p
    draws = int(expected + 10.0 * math.sqrt(expected) + 32)
    u = torch.empty(draws, dtype=torch.float64, device=device).uniform_()
    gaps = u.neg_().log1p_().mul_(1.0 / math.log1p(-p)).to(torch.int64).add_(1)  # to(int64) floors: >= 0
    gaps[:1].sub_(1)  # so that the running sum is the 0-based index
    return gaps.cumsum_(0)


# CPU batch chunking (see _batch_chunks): above _CPU_SPLIT_BYTES of operands, work goes a chunk of about
# _CPU_CHUNK_BYTES at a time. Fresh tensors of tens of MB are mmap-ed from the OS on every call (page
# faults cost ~10 ms per 35 MB here) and fall out of cache between passes; chunks are reused and stay hot.
_CPU_SPLIT_BYTES = 16 << 20
_CPU_CHUNK_BYTES = 4 << 20


def _batch_chunks(n: int, bytes_per_sample: int, like: Tensor) -> list[slice] | None:
    """Slices of the batch to process one at a time, or None for the whole batch at once.

    Why: KernelNorm is batch independent, so nothing changes (up to rounding) when a layer runs a
    few samples at a time, and on CPU it pays: oneDNN's convolution and its backward allocate and
    reorder into temporaries the size of their operands, fresh memory (page faults) on every call
    above ~32 MB, and whole-batch temporaries do not stay in cache for the passes that follow.
    Measured at batch 32 on a 2-core CPU: 4-sample chunks made a bare convolution plus its
    backward 1.8-2.3x faster for the three 32x32-map layers of KNResNet-18, while splitting
    layers of under ~16 MB (many channels, small maps) made them slower (per-call overhead);
    hence the two thresholds (the whole layer's gain: ``benchmarks/knconv.py --whole-batch``).
    Off CPU (the CUDA caching allocator has no such cost) and for non-NCHW layouts the batch is
    never split.
    """
    if like.device.type != "cpu" or torch.jit.is_tracing() or not like.is_contiguous():
        return None
    if n * bytes_per_sample <= _CPU_SPLIT_BYTES:
        return None
    step = max(1, _CPU_CHUNK_BYTES // max(bytes_per_sample, 1))
    return [slice(start, start + step) for start in range(0, n, step)]


def _conv_chunks(src: Tensor, out_shape: tuple[int, ...]) -> list[slice] | None:
    """:func:`_batch_chunks` for a KNConv2d whose (padded) source is ``src`` and output has ``out_shape``.

    Forward and backward must split the batch alike, so both ask this with the same shapes.
    """
    bytes_per_sample = (math.prod(src.shape[1:]) + math.prod(out_shape[1:])) * src.element_size()
    return _batch_chunks(src.shape[0], bytes_per_sample, src)


def _chunked(chunks: list[slice] | None, *tensors: Tensor | None) -> list[tuple]:
    """Per chunk, the batch slices of ``tensors`` (None stays None); the tensors themselves for no chunks."""
    if chunks is None:
        return [tensors]
    return [tuple(None if t is None else t[chunk] for t in tensors) for chunk in chunks]


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(dim=1, keepdim=True)``, in batch chunks on CPU (no ``a``-sized temporary)."""
    chunks = _batch_chunks(a.shape[0], math.prod(a.shape[1:]) * a.element_size(), a)
    if chunks is None:
        return (a * b).sum(dim=1, keepdim=True)
    return torch.cat([(pa * pb).sum(dim=1, keepdim=True) for pa, pb in _chunked(chunks, a, b)])


class _Dropout:
    """The statistics dropout of one forward pass: which source elements it drops, their values, the rescale.

    ``position`` is where each drop lands in the ``(N + 1, 2, H, W)`` buffer of channel sums that
    :func:`_pooled_statistics` fills (row 0 of its sample and position); drops past the end of the
    source (:func:`draw_dropped`'s tail) land in the extra sample ``N``, which nothing reads, so
    they need no mask.
    """

    def __init__(self, src: Tensor, p: float) -> None:
        n, c, h, w = src.shape
        plane = h * w
        index = draw_dropped(src.numel(), p, src.device)
        self.position = (
            torch.div(index, c * plane, rounding_mode="floor").mul_(2 * plane).add_(index % plane).clamp_max_(2 * n * plane)
        )
        self.index = index.clamp_max_(src.numel() - 1)
        self.values = torch.take(src, self.index)  # gathered once, reused by backward
        self.scale = 1.0 / (1.0 - p)

    @classmethod
    def draw(cls, src: Tensor, p: float, training: bool) -> _Dropout | None:
        """The dropout a forward pass over ``src`` applies: none in eval mode, at p = 0 or on an empty batch."""
        return cls(src, p) if training and p > 0 and src.numel() else None


def _pooled_statistics(
    src: Tensor, dropout: _Dropout | None, kernel_size: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Unit mean and ``E[x^2] - E[x]^2`` (not yet clamped), each (N, 1, H_out, W_out).

    Both channel sums (of the dropped-out source and of its square) go into one ``(N + 1, 2, H, W)``
    buffer, so a single pooling serves both; the extra sample absorbs the dropout's tail.
    """
    n, channels, h, w = src.shape
    sums = src.new_empty(n + 1, 2, h, w)  # sample n: scratch for draw_dropped's tail, never read
    sums[:n, :1] = src.sum(dim=1, keepdim=True)
    sums[:n, 1:] = _channel_dot(src, src)
    scale = 1.0
    if dropout is not None:
        flat, dropped = sums.view(-1), dropout.values
        flat.index_add_(0, dropout.position, dropped, alpha=-1.0)
        flat[h * w :].index_add_(0, dropout.position, dropped * dropped, alpha=-1.0)
        scale = dropout.scale
    pooled = F.avg_pool2d(sums[:n], kernel_size, stride, pad, count_include_pad=True)
    mean = pooled[:, :1].mul_(scale / channels)
    return mean, pooled[:, 1:].mul_(scale * scale / channels).addcmul_(mean, mean, value=-1.0)


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
    copy (a regularizer; see :func:`draw_dropped`) while :class:`KNConv2d` convolves the original
    input. The drops are drawn over :func:`split_padding`'s source with the default generator, as
    the layer's first random operation, so replaying the random state (``fedkn.privacy``)
    reproduces the statistics a forward pass used. Not differentiable: :class:`KNConv2d`
    differentiates through these statistics itself.
    """
    src, pool_pad = split_padding(x, padding, kernel_size)
    dropout = _Dropout.draw(src, dropout_p, training)
    with torch.no_grad():
        mean, var = _pooled_statistics(src, dropout, kernel_size, stride, pool_pad)
    return mean, var.clamp_min_(0.0)


class _KNConv(torch.autograd.Function):
    """The whole KNConv2d as one autograd node: ``(conv(src, w) - mean * sum(w)) * rstd + b``.

    Why one node: autograd over the separate pieces keeps several output-sized temporaries and sums
    the input gradients of the statistics and of the convolution into yet another one; on CPU every
    fresh tensor of tens of MB costs page faults that outweigh the arithmetic. Here the output is
    standardized as the convolution produces it, so a layer allocates one output-sized tensor, as a
    bare Conv2d does, and backward allocates the scaled upstream gradient that the convolution's
    backward needs and reuses it for the statistics' gradients. Large layers on CPU do this a batch
    chunk at a time (:func:`_batch_chunks`). A consequence: the output must not be modified in
    place before backward (autograd raises if it is), as for any layer that saves its output.

    ``forward`` returns its intermediates as extra, non-differentiable outputs so that
    ``setup_context`` can save them (the form ``torch.func`` transforms require):
    ``(out, mean, var, rstd, weight_sum, padded_source_or_None, dropout_or_None)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, weight: Tensor, bias: Tensor | None, geometry: tuple, dropout_p: float, eps: float, training: bool
    ) -> tuple:
        kernel_size, stride, padding, groups = geometry
        src, pad = split_padding(x, padding, kernel_size)  # padded at most once
        dropout = _Dropout.draw(src, dropout_p, training)
        mean, var = _pooled_statistics(src, dropout, kernel_size, stride, pad)
        rstd = var.clamp_min(0.0).add_(eps).rsqrt_()
        weight_sum = weight.sum(dim=(1, 2, 3))
        n, _, h, w = mean.shape
        out_shape = (n, weight.shape[0], h, w)
        chunks = _conv_chunks(src, out_shape)
        out = None if chunks is None else src.new_empty(out_shape)
        for src_c, mean_c, rstd_c, out_c in _chunked(chunks, src, mean, rstd, out):
            conv = F.conv2d(src_c, weight, None, stride, pad, 1, groups)
            conv.addcmul_(mean_c, weight_sum.view(1, -1, 1, 1), value=-1.0)
            if out_c is None:  # the whole batch: in place
                out = out_c = conv
            if bias is None:
                torch.mul(conv, rstd_c, out=out_c)
            else:  # one pass for the scaling and the bias
                torch.addcmul(bias.view(1, -1, 1, 1), conv, rstd_c, out=out_c)
        drops = (dropout.index, dropout.values, dropout.position) if dropout is not None else None
        return out, mean, var, rstd, weight_sum, None if src is x else src, drops

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, weight, bias, geometry, dropout_p, _eps, _training = inputs
        out, mean, var, rstd, weight_sum, padded, drops = output
        ctx.mark_non_differentiable(mean, var, rstd, weight_sum, *([padded] if padded is not None else []))
        ctx.set_materialize_grads(False)
        # Output-channel coefficients of the saved output's affine terms: weight_sum, and bias if any.
        coeffs = weight_sum.view(1, -1) if bias is None else torch.stack([weight_sum, bias.detach()])
        ctx.save_for_backward(x if padded is None else padded, weight, out, mean, var, rstd, coeffs, *(drops or ()))
        ctx.geometry = geometry
        ctx.padded = padded is not None
        ctx.scale = 1.0 / (1.0 - dropout_p) if drops is not None else 1.0

    @staticmethod
    def backward(ctx, g: Tensor | None, *_unused: Tensor | None) -> tuple:  # type: ignore[override]
        if g is None:
            return None, None, None, None, None, None, None
        src, weight, out, mean, var, rstd, coeffs, *drops = ctx.saved_tensors
        kernel_size, stride, padding, groups = ctx.geometry
        pad = (0, 0) if ctx.padded else _op_padding(padding, kernel_size)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        n, o, h, w = g.shape
        channels, plane, scale = src.shape[1], src.shape[2] * src.shape[3], ctx.scale
        chunks = _conv_chunks(src, g.shape)
        # The statistics' gradients unpooled to the source's positions; the extra sample stays 0 (_Dropout).
        unpooled = g.new_zeros(n + 1, 2, src.shape[2], src.shape[3]) if need_x else None
        grad_src = src.new_empty(src.shape) if need_x and chunks is not None else None
        grad_weight = sums = None
        for g_c, src_c, out_c, mean_c, var_c, rstd_c, unpooled_c, grad_src_c in _chunked(
            chunks, g, src, out, mean, var, rstd, None if unpooled is None else unpooled[:n], grad_src
        ):
            m = g_c.shape[0]
            g_hat = g_c * rstd_c  # the convolution's upstream gradient
            grad_conv, grad_w, _ = torch.ops.aten.convolution_backward(
                g_hat, src_c, weight, None, list(stride), list(pad), [1, 1], False, [0, 0], groups,
                [need_x, need_w, False],
            )
            grad_weight = grad_w if grad_weight is None else grad_weight.add_(grad_w)
            g_flat = g_hat.reshape(m, o, h * w)
            if need_w or need_b:
                # Per output channel, one pass over g_hat: sum g_hat * mean (d out / d weight_sum[o] is
                # -mean * rstd, and weight_sum[o] sums weight[o]) and sum g_hat / rstd = sum g (the bias).
                # The transposed product is 2-5x faster on CPU than g_hat @ rows (a GEMV per sample).
                rows = torch.cat([mean_c, rstd_c.reciprocal()], dim=1).view(m, 2, h * w)
                part = torch.bmm(rows, g_flat.transpose(1, 2)).sum(dim=0)
                sums = part if sums is None else sums.add_(part)
            if not need_x:
                continue
            # rstd * sum_o g * coeffs[k, o] for weight_sum (k=0) and bias (k=1), one pass over g_hat.
            g_coeffs = torch.bmm(coeffs.unsqueeze(0).expand(m, -1, -1), g_flat).view(m, coeffs.shape[0], h, w)
            # a = rstd * sum_o g * (out - b), with g_hat's memory reused for the product.
            a = g_hat.mul_(out_c).sum(dim=1, keepdim=True)
            if coeffs.shape[0] == 2:
                a.sub_(g_coeffs[:, 1:])
            # out - b = (conv - mean * weight_sum) * rstd with rstd = (clamp(var, 0) + eps)^-1/2, so
            # d out / d var = (out - b) * -rstd^2 / 2 (where var >= 0: clamp passes no gradient below),
            # and d out / d mean = -weight_sum * rstd, plus var = E[x^2] - mean^2.
            grad_var = a.mul_(rstd_c).mul_(-0.5).masked_fill_(var_c < 0, 0.0)
            grad_mean = torch.addcmul(g_coeffs[:, :1], mean_c, grad_var, value=2.0).neg_()
            # mean = scale/C * pool(sum_c kept) and E[x^2] = scale^2/C * pool(sum_c kept * x), kept
            # the dropped-out x: unpool both at once.
            grad_stats = torch.cat([grad_mean.mul_(scale / channels), grad_var.mul_(2.0 * scale * scale / channels)], 1)
            unpooled_c.copy_(  # unpooled_c stands in for the pooled input: only its shape is read
                torch.ops.aten.avg_pool2d_backward(
                    grad_stats, unpooled_c, list(kernel_size), list(stride), list(pad), False, True, None
                )
            )
            grad_conv = grad_conv.contiguous().add_(unpooled_c[:, :1])
            if grad_src_c is None:  # the whole batch: in place
                grad_src = grad_conv.addcmul_(src_c, unpooled_c[:, 1:])
            else:
                torch.addcmul(grad_conv, src_c, unpooled_c[:, 1:], out=grad_src_c)
        grad_bias = None
        if sums is not None:
            if need_w:
                grad_weight = grad_weight.sub_(sums[0].view(-1, 1, 1, 1))
            grad_bias = sums[1] if need_b else None
        if not need_x:
            return None, grad_weight, grad_bias, None, None, None, None
        if drops:  # dropped elements feed no statistic: take their share back out
            index, values, position = drops
            flat = unpooled.view(-1)
            share = torch.take(flat, position).addcmul_(values, torch.take(flat[plane:], position))
            grad_src.view(-1).index_add_(0, index, share, alpha=-1.0)
        if ctx.padded:  # the input's part of the padded source's gradient
            left, right, top, bottom = padding
            grad_src = grad_src[:, :, top : src.shape[2] - bottom, left : src.shape[3] - right]
        return grad_src, grad_weight, grad_bias, None, None, None, None


# Function.apply binds the arguments with inspect.signature on every call when setup_context is
# defined (~40 us, a fifth of a small layer's forward); a precomputed signature is returned as is.
_KNConv.forward.__signature__ = inspect.signature(_KNConv.forward)  # type: ignore[attr-defined]


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
        geometry = (self.kernel_size, self.stride, self.padding, self.groups)
        return _KNConv.apply(x, self.weight, self.bias, geometry, self.dropout_p, self.eps, self.training)[0]

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, "
            f"dropout_p={self.dropout_p}, eps={self.eps}"
        )

