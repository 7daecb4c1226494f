"""Adaptive gradient clipping (AGC; Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale
Image Recognition Without Normalization"), as local training applies it (config ``agc-clip``).

Without normalization layers nothing stops one large gradient from moving a layer's weights far
relative to their size; AGC bounds that ratio per *unit* (one output row of a weight):

    g_i <- g_i * clip * max(||W_i||, eps) / ||g_i||    where ||g_i|| > clip * max(||W_i||, eps)

and leaves every other unit's gradient untouched. A unit is an output channel of a convolution or
an output row of a linear layer (the norm runs over all other dimensions); a bias or gain vector
is one unit. ``eps = 1e-3`` keeps zero-initialized parameters (biases) trainable. As in NFNets,
the final linear layer (the classifier) is not clipped. Plain PyTorch; no Flower here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

#: Floor of a unit's weight norm (NFNets), so a zero-initialized bias can still move.
EPS = 1e-3


def unitwise_norm(t: Tensor) -> Tensor:
    """L2 norm per output unit, broadcastable against ``t``; a vector or scalar is one unit."""
    if t.ndim <= 1:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)


@torch.no_grad()
def clip_(params: Iterable[nn.Parameter], clip: float, eps: float = EPS) -> None:
    """Clip each parameter's ``.grad`` in place, unit by unit, to ``clip`` times its weight norm."""
    for p in params:
        if p.grad is None:
            continue
        limit = unitwise_norm(p.detach()).clamp_min(eps) * clip
        g_norm = unitwise_norm(p.grad)
        factor = torch.where(g_norm > limit, limit / g_norm.clamp_min(1e-12), torch.ones_like(g_norm))
        p.grad.mul_(factor)


def clipped_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters AGC clips: all but those of the model's last ``nn.Linear``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    skip = {id(p) for p in linears[-1].parameters()} if linears else set()
    return [p for p in model.parameters() if p.requires_grad and id(p) not in skip]


def attach(optimizer: torch.optim.Optimizer, model: nn.Module, clip: float) -> None:
    """Clip ``model``'s gradients with AGC right before every step of ``optimizer``.

    Under DP-SGD ``optimizer`` is Opacus' ``DPOptimizer``; fedkn's DP step calls the optimizer it
    wraps after clipping per sample and adding noise, so the hook goes there: AGC then only
    post-processes the private gradient and costs no privacy. Weight decay and momentum come after
    it, inside the optimizer's step.
    """
    params = clipped_parameters(model)
    target = getattr(optimizer, "original_optimizer", optimizer)
    target.register_step_pre_hook(lambda _opt, _args, _kwargs: clip_(params, clip))
