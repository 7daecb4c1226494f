"""Normalization-free layers (the ``nf`` norm): scaled weight standardization and scaled residuals.

FedWon (Zhuang & Lyu, ICLR 2024) removes every normalization layer from the network and trains
what is left federatedly; its layers are those of the normalization-free ResNets (NF-ResNets,
Brock, De & Smith, ICLR 2021), which keep a deep network's signal at unit scale without
normalizing activations:

- **Scaled weight standardization** (:class:`ScaledWSConv2d`): the kernel of output channel ``o``
  is used as ``W_hat[o] = gain[o] * gamma * (W[o] - mean(W[o])) / (std(W[o]) * sqrt(fan_in))``
  plus a bias. A unit-variance input then gives a unit-variance output whatever ``W`` is, and
  ``gamma = sqrt(2 / (1 - 1/pi))`` undoes the variance a ReLU removes (for ``z ~ N(0, 1)``,
  ``gamma * relu(z)`` has unit variance). ``gain`` (one per output channel, initialized to 1) and
  the bias are learnable. Nothing depends on the batch, so it trains at batch size 1 and under
  DP-SGD.
- **Scaled residuals** (:class:`NFResidual`): ``x + alpha * f(x / beta)``, where ``beta`` is the
  *expected* standard deviation of the residual stream at that block (computed analytically, not
  measured) and ``alpha`` (0.2) the rate at which the variance grows per block. A transition block
  (one with a shortcut convolution) applies its shortcut to ``x / beta`` too, which resets the
  expected variance to ``1 + alpha**2``; an identity block adds ``alpha**2``.
  :func:`set_signal_scales` fills in every block's ``beta`` once the model is built.

Where fedkn deviates from the papers (the models are fedkn's shared skeletons, written once for
every norm):

- ``gamma`` is folded into every scaled WS convolution except the model's first one (its input is
  the image, not a ReLU output), because the models use plain ``nn.ReLU``; NF-ResNets scale the
  activation itself. The two are the same function for convolutions that follow a ReLU; a max-pool
  or residual sum in between is treated like the ReLU output it is taken of.
- ``beta`` follows the NF-ResNet recursion (variance ``1`` at the stem, ``+ alpha**2`` per identity
  block, reset at transitions). Plain conv blocks between residual blocks (ResNet-8, VGG-6) are
  taken to preserve the variance, as scaled WS layers do; pooling is ignored.
- ResNet-18/34/50 here are post-activation (a ReLU after each residual sum); NF-ResNets are
  pre-activation. ResNet-8's residual blocks have no activation after the sum, as NF-ResNets.
- No SkipInit gain, no dropout before the classifier, and the classifier keeps fedkn's common
  initialization (NFNets zero it); the weight eps is 1e-5 on the per-weight variance (``WSConv2d``'s).

Under DP-SGD, :class:`ScaledWSConv2d` is :class:`~fedkn.nn.wsconv.WSConv2d` (which has its own
per-sample-gradient rule) followed by :class:`ChannelGain` (elementwise, handled by Opacus'
functorch fallback); ``conv(x, c * W_hat) = c * conv(x, W_hat)`` makes the two the same function.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedkn.nn.wsconv import WSConv2d

#: ``gamma`` for ReLU (Brock et al. 2021): ``Var(gamma * relu(z)) = 1`` for ``z ~ N(0, 1)``.
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


class ChannelGain(nn.Module):
    """``x * gain[c] * scale + bias[c]`` per channel: the learnable gain and bias of a scaled WS conv.

    ``scale`` is a constant (``gamma / sqrt(fan_in)``), kept out of the parameter so that ``gain``
    starts at 1 and SGD sees the papers' parametrization.
    """

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)
        self.gain = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * (self.gain * self.scale).view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.gain.numel()}, scale={self.scale:.4g}"


class ScaledWSConv2d(nn.Module):
    """Scaled weight-standardized convolution with a learnable gain and bias (NF-ResNets)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.fan_in = in_channels * kernel_size * kernel_size
        self.conv = WSConv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.affine = ChannelGain(out_channels, RELU_GAMMA / math.sqrt(self.fan_in))

    def set_gamma(self, gamma: float) -> None:
        """The activation gain folded into this layer (1 for a layer whose input is not a ReLU output)."""
        self.affine.scale = gamma / math.sqrt(self.fan_in)

    def forward(self, x: Tensor) -> Tensor:
        return self.affine(self.conv(x))


class NFResidual(nn.Module):
    """``skip + alpha * body(x / beta)``; ``skip`` is ``x``, or ``shortcut(x / beta)`` in a transition block."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None, *, alpha: float = 0.2) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        self.alpha = float(alpha)
        self.beta = 1.0  # set by set_signal_scales once the whole model exists

    def forward(self, x: Tensor) -> Tensor:
        h = x / self.beta
        skip = x if self.shortcut is None else self.shortcut(h)
        return skip + self.alpha * self.body(h)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, beta={self.beta:.4g}"


def set_signal_scales(model: nn.Module) -> None:
    """Fill in each :class:`NFResidual`'s expected input std ``beta``, and the first conv's ``gamma = 1``.

    Walks the modules in construction order, which is the forward order of fedkn's models.
    """
    variance = 1.0
    first = True
    for m in model.modules():
        if isinstance(m, ScaledWSConv2d) and first:
            m.set_gamma(1.0)
            first = False
        elif isinstance(m, NFResidual):
            m.beta = math.sqrt(variance)
            variance = (1.0 if m.shortcut is not None else variance) + m.alpha**2
