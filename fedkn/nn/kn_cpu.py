"""KNConv2d's fast CPU path: the convolution is torch's, KernelNorm's own work is two compiled loops.

Why: at the batch sizes federated clients train with (8-16) and small models, a KNConv2d written
in tensor ops costs a dozen small operators (channel sums, pooling, the dropout's corrections, the
standardization, and their backward), each a full pass over a small tensor plus Python and
dispatch overhead; together they cost more than the convolution. Here one loop per sample computes
the unit statistics and standardizes the convolution's output in place (forward), and one loop
computes the statistics' backward (``kn_cpu.cpp``). The maths is exactly
:func:`fedkn.nn.kernelnorm.kn_conv2d_reference`'s, with the same dropout draws; tests hold the two
equal in float64.

The C++ file has no dependency on torch (raw arrays through :mod:`ctypes`), so it builds with the
system compiler in about a second, once per machine: the shared object is cached under
``$FEDKN_CACHE_DIR`` (default ``~/.cache/fedkn``), named by a hash of the source and flags, and
written atomically so that concurrent processes (Ray workers) can race safely. Without a compiler
:func:`unsupported` says why and KNConv2d falls back to the reference, after a one-line notice.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from fedkn.nn.kernelnorm import UnitGeometry

_SOURCE = Path(__file__).with_name("kn_cpu.cpp")
# -march=native for this machine's vector units (the cache key includes the CPU, see _cpu_id); the
# math flags only let the compiler reorder sums into vector lanes (no approximations, no flush to zero).
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_P = ctypes.c_void_p
_ARGTYPES = {
    "forward": [_P, _P, _P, ctypes.c_int64, ctypes.c_double, ctypes.c_double, _P, _P, _P, _P, _P, _P],
    "backward": [_P, _P, _P, ctypes.c_int64, ctypes.c_double, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P],
}


def _cache_dir() -> Path:
    explicit = os.environ.get("FEDKN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedkn"


def _cpu_id() -> str:
    """The CPU model and feature flags (what -march=native compiles for), so a shared cache never mixes CPUs."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    return os.uname().machine + "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def _build() -> ctypes.CDLL:
    """Compile ``kn_cpu.cpp`` (or reuse the cached build) and load it."""
    source = _SOURCE.read_bytes()
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise OSError("no C++ compiler (g++ or c++) on PATH")
    key = hashlib.sha256(source + " ".join((compiler, *_FLAGS, _cpu_id())).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kn_cpu-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            done = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built)], capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                raise OSError(f"{compiler} failed: {(done.stderr.strip().splitlines() or ['?'])[0]}")
            os.replace(built, target)  # atomic: a concurrent build of the same source is identical
    lib = ctypes.CDLL(str(target))
    for suffix in _SUFFIX.values():
        for name, argtypes in _ARGTYPES.items():
            getattr(lib, f"kn_{name}_{suffix}").argtypes = argtypes
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None (after a one-line notice) when they cannot be built."""
    try:
        return _build()
    except OSError as err:
        print(f"fedkn: KernelNorm's fused CPU kernels are unavailable ({err}); using the reference path",
              file=sys.stderr)
        return None


def unsupported(x: Tensor, weight: Tensor) -> str | None:
    """Why the fused path cannot take this call, or None when it can."""
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return "the fused kernels run on the CPU only"
    if x.dtype not in _SUFFIX or weight.dtype != x.dtype:
        return f"the fused kernels take float32 or float64 tensors of one dtype, got {x.dtype} and {weight.dtype}"
    if library() is None:
        return "the fused CPU kernels could not be built"
    return None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Standardize(torch.autograd.Function):
    """``out = (conv - mean * weight_sum) * rstd + bias`` in place on ``conv``, the statistics taken from ``x``.

    Backward returns the convolution's output gradient (``g * rstd``; autograd then runs the
    convolution's own backward), the statistics' share of ``x``'s gradient, and the gradients of
    ``weight_sum`` and ``bias``. Saving the output (the modified ``conv``) means it must not be
    edited in place before backward; autograd raises if it is.
    """

    @staticmethod
    def forward(ctx, conv, x, weight_sum, bias, geometry, dropped, scale, eps):  # type: ignore[override]
        mean, rstd, negative = _forward(conv, x, weight_sum, bias, geometry, dropped, scale, eps)
        ctx.mark_dirty(conv)
        ctx.save_for_backward(x, conv, weight_sum, bias, mean, rstd, negative, dropped)
        ctx.geometry, ctx.scale = geometry, scale
        return conv

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, out, weight_sum, bias, mean, rstd, negative, dropped = ctx.saved_tensors
        grad = grad.contiguous()
        g_hat = torch.empty_like(grad)
        grad_weight_sum = torch.empty_like(weight_sum)
        grad_bias = None if bias is None else torch.empty_like(bias)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[1] else None
        getattr(library(), f"kn_backward_{_SUFFIX[x.dtype]}")(
            _ptr(x), _ptr(ctx.geometry), _ptr(dropped), 0 if dropped is None else dropped.numel(), ctx.scale,
            _ptr(weight_sum), _ptr(bias), _ptr(out), _ptr(mean), _ptr(rstd), _ptr(negative), _ptr(grad),
            _ptr(g_hat), _ptr(grad_weight_sum), _ptr(grad_bias), _ptr(grad_x),
        )
        return g_hat, grad_x, grad_weight_sum, grad_bias, None, None, None, None


def _forward(
    conv: Tensor, x: Tensor, weight_sum: Tensor, bias: Tensor | None, geometry: Tensor, dropped: Tensor | None,
    scale: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    n, _, ho, wo = conv.shape
    mean, rstd = x.new_empty(n, 1, ho, wo), x.new_empty(n, 1, ho, wo)
    negative = torch.empty(n, 1, ho, wo, dtype=torch.uint8)  # where var < 0 before the clamp (no gradient)
    getattr(library(), f"kn_forward_{_SUFFIX[x.dtype]}")(
        _ptr(x), _ptr(geometry), _ptr(dropped), 0 if dropped is None else dropped.numel(), scale, eps,
        _ptr(weight_sum), _ptr(bias), _ptr(conv), _ptr(mean), _ptr(rstd), _ptr(negative),
    )
    return mean, rstd, negative


def kn_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    units: UnitGeometry,
    dropped: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """:func:`fedkn.nn.kernelnorm.kn_conv2d_reference` on the fused kernels (same arguments, same result)."""
    kernel_size, stride, padding, groups, eps = units.kernel_size, units.stride, units.padding, units.groups, units.eps
    x = x.contiguous()
    left, right, top, bottom = padding
    if left == right and top == bottom:  # the convolution pads; the kernels treat outside as zeros
        conv = F.conv2d(x, weight, None, stride, (top, left), 1, groups)
    else:
        conv = F.conv2d(F.pad(x, padding), weight, None, stride, 0, 1, groups)
    conv = conv.contiguous()
    weight_sum = weight.sum(dim=(1, 2, 3)).contiguous()
    bias = None if bias is None else bias.contiguous()
    geometry = torch.tensor([*x.shape, conv.shape[1], *conv.shape[2:], *kernel_size, *stride, top, left])
    scale = 1.0 / (1.0 - dropout_p) if dropped is not None else 1.0
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _Standardize.apply(conv, x, weight_sum, bias, geometry, dropped, scale, eps)
    _forward(conv, x, weight_sum, bias, geometry, dropped, scale, eps)
    return conv
