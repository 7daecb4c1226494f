"""Weight-standardized convolution (Qiao et al. 2019), paired with GroupNorm as the ``wsgn`` norm.

Like :class:`~fedkn.nn.kernelnorm.KNConv2d` it is not a Conv2d subclass: its output is a
convolution with *standardized* weights, so Opacus must not apply the plain-conv per-sample
gradient rule to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WSConv2d(nn.Module):
    """Conv2d whose weights are standardized per output channel (zero mean, unit variance) on use."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        groups: int = 1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups, self.eps = kernel_size, stride, padding, groups, eps
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, correction=0)
        weight = (self.weight - mean) * torch.rsqrt(var + self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, 1, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}"
        )
