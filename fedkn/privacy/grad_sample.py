"""Per-sample gradients for fedkn's own layers under Opacus: registered rules, not functorch.

Opacus computes per-sample gradients with module hooks: a forward hook keeps each layer's input
(``activations``), a backward hook receives the gradient w.r.t. the layer's output (``backprops``)
and a *grad sampler* registered for the layer's exact type turns the two into one gradient per
sample. Layers without a registered rule fall back to ``torch.func`` (vmap of grad over a
re-run of the layer, one sample at a time).

This module registers rules for :class:`~fedkn.nn.kernelnorm.KNConv2d` and
:class:`~fedkn.nn.wsconv.WSConv2d` (neither is an ``nn.Conv2d`` subclass, on purpose, so Opacus
never applies the plain convolution rule to them). Why rules rather than the functorch fallback:

- **Correctness with KernelNorm's statistics dropout.** In training mode KNConv2d takes its unit
  statistics from a dropped-out copy of the input. The functorch fallback re-runs the layer inside
  ``vmap``; Opacus builds that vmap with ``randomness="error"``, so it raises, and with any other
  randomness mode it would draw *new* masks, i.e. return gradients of a different function than
  the one the forward pass computed (their sum would not equal the batch gradient). The rule here
  uses the statistics the forward pass actually used (see :func:`attach_kn_statistics`).
- **Speed.** The rule costs one per-sample convolution weight gradient (see
  :func:`conv_weight_grad_sample`) plus a few reductions; functorch re-runs forward and backward
  of every layer under vmap.

KNConv2d rule. With ``x_pad`` the padded input, ``mu``/``var`` the unit statistics, ``r =
rsqrt(var + eps)``, ``S[o] = sum(w[o])`` and ``out = (conv(x_pad, w) - mu * S) * r + b``, the
per-sample gradients for a sample with output gradient ``g`` are::

    dL/db[o]         = sum_p g[o, p]
    dL/dw[o, i, u, v] = convgrad_w(x_pad, g * r)[o, i, u, v] - sum_p g[o, p] * r[p] * mu[p]

where ``p`` runs over output positions and ``convgrad_w`` is the weight gradient of an ordinary
convolution (the second term is the same for every input channel and kernel position of ``o``).
``mu`` and ``r`` do not depend on ``w``; their dependence on the input is autograd's business.

Getting the statistics the forward pass used: :func:`attach_kn_statistics` adds a forward
pre-hook (saves the RNG state just before the layer runs) and a forward hook, registered *after*
Opacus' own, that recomputes the statistics with :func:`~fedkn.nn.kernelnorm.unit_statistics`
from the saved RNG state (inside ``torch.random.fork_rng``, so the global RNG stream is left
exactly as the forward pass left it; the same replay technique ``torch.utils.checkpoint`` uses
for dropout) and appends ``(mu, r)`` to the activations Opacus just saved. They then travel with
the activations through Opacus' push/pop bookkeeping, so repeated calls of one layer stay paired.
This relies on KNConv2d drawing its dropout with
:func:`~fedkn.nn.kernelnorm.draw_statistics_dropout` as the first random operation of its forward,
whichever ``impl`` computes it, and ``unit_statistics`` drawing the same way;
``tests/test_privacy_grad_sample.py`` checks that per-sample gradients in training mode with
dropout equal a per-sample loop over the very same forward pass.

Use :func:`attach` (or :func:`fedkn.privacy.dpsgd.make_private`) rather than Opacus' classes
directly: it adds both Opacus' hooks and the statistics hooks, and :func:`detach` removes all of
them again (the client app reuses one model object across rounds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleHooks, register_grad_sampler
from torch import Tensor, nn

from fedkn.errors import FedknError
from fedkn.nn.kernelnorm import KNConv2d, unit_statistics
from fedkn.nn.wsconv import WSConv2d

#: ``"conv"``: per-sample weight gradients as one grouped convolution (no unfolding);
#: ``"unfold"``: Opacus' unfold + einsum (``kh*kw`` times the input's memory). ``"auto"`` (default)
#: picks per layer call: ``conv`` for output maps of 14x14 or more, or when unfolding would
#: exceed 32M values; ``unfold`` for the small maps where it is faster (see :func:`_pick_method`).
METHODS: tuple[str, ...] = ("auto", "conv", "unfold")
_method = "auto"

_HOOKS_ATTR = "_fedkn_kn_stat_hooks"


def set_method(method: str) -> None:
    """Choose how per-sample convolution weight gradients are computed (see :data:`METHODS`)."""
    global _method
    if method not in METHODS:
        raise FedknError(f"per-sample gradient method must be one of {', '.join(METHODS)}, got {method!r}")
    _method = method


def _pick_method(x_pad: Tensor, grad_out: Tensor, kernel_size: tuple[int, int]) -> str:
    if _method != "auto":
        return _method
    # Measured on CPU (1 thread, batch 8-64, 1-128 channels): the grouped convolution wins when the
    # output maps are large (it runs N*groups convolutions with H_out x W_out kernels), up to 2x at
    # 32x32; unfold + one batched matmul wins on small maps (8x8 and below: up to 6x). Past ~32M
    # unfolded values, unfold's memory alone rules it out.
    n, c = x_pad.shape[:2]
    positions = grad_out.shape[2] * grad_out.shape[3]
    unfolded = n * c * kernel_size[0] * kernel_size[1] * positions
    return "conv" if positions >= 196 or unfolded > 32_000_000 else "unfold"


def conv_weight_grad_sample(
    x_pad: Tensor,
    grad_out: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    groups: int,
    method: str | None = None,
) -> Tensor:
    """Per-sample weight gradient of ``conv2d(x_pad, w, stride=stride, groups=groups)`` (no padding).

    ``x_pad`` is (N, C_in, H, W), ``grad_out`` (N, C_out, H_out, W_out); returns
    (N, C_out, C_in/groups, kh, kw). ``method="conv"`` computes all of them as one grouped
    convolution of the inputs with the output gradients as kernels (``N*groups`` groups, the
    stride becoming a dilation), never unfolding the input; ``"unfold"`` is Opacus' own
    unfold + einsum.
    """
    n, c_in, h, w = x_pad.shape
    c_out, h_out, w_out = grad_out.shape[1:]
    kh, kw = kernel_size
    if n == 0:
        return x_pad.new_zeros((0, c_out, c_in // groups, kh, kw))
    method = method or _pick_method(x_pad, grad_out, kernel_size)
    if method == "unfold":
        cols = F.unfold(x_pad, kernel_size, stride=stride)  # (N, C_in*kh*kw, L)
        cols = cols.view(n, groups, (c_in // groups) * kh * kw, h_out * w_out)
        g = grad_out.reshape(n, groups, c_out // groups, h_out * w_out)
        out = torch.einsum("ngol,ngpl->ngop", g, cols)
        return out.reshape(n, c_out, c_in // groups, kh, kw)
    if method != "conv":
        raise FedknError(f"per-sample gradient method must be one of {', '.join(METHODS)}, got {method!r}")
    # Inputs as (C_in/G, N*G, H, W): every (sample, group) pair is one channel of a grouped conv.
    inp = x_pad.reshape(n * groups, c_in // groups, h, w).transpose(0, 1)
    # Output gradients as kernels (N*C_out, 1, H_out, W_out): C_out/G kernels per (sample, group).
    kernels = grad_out.reshape(n * c_out, 1, h_out, w_out)
    res = F.conv2d(inp, kernels, None, stride=1, padding=0, dilation=stride, groups=n * groups)
    # (C_in/G, N*C_out, kh', kw') with kh' >= kh when the stride does not divide the input evenly.
    res = res[:, :, :kh, :kw].reshape(c_in // groups, n, c_out, kh, kw)
    return res.permute(1, 2, 0, 3, 4).contiguous()


def _empty(layer: nn.Module) -> dict[nn.Parameter, Tensor]:
    out = {layer.weight: layer.weight.new_zeros((0, *layer.weight.shape))}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = layer.bias.new_zeros((0, *layer.bias.shape))
    return out


def kn_statistics(layer: KNConv2d, x: Tensor, rng: Any = None) -> tuple[Tensor, Tensor]:
    """``(mu, rsqrt(var + eps))`` of every unit of ``x`` as the layer's forward pass computed them.

    ``rng`` is the state :func:`attach_kn_statistics` saved before the forward pass (needed only in
    training mode with dropout, where the statistics come from a dropped-out copy of the input).
    """
    dropout = layer.training and layer.dropout_p > 0
    if not dropout:
        mean, var = unit_statistics(x, layer.kernel_size, layer.stride, layer.padding, 0.0, False)
    else:
        if rng is None:
            raise FedknError(
                "per-sample gradients of a KNConv2d with statistics dropout need the forward pass's "
                "random state; attach Opacus with fedkn.privacy.attach(model) instead of GradSampleModule"
            )
        cpu_state, cuda_state = rng
        devices = [x.device.index or 0] if cuda_state is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, x.device)
            mean, var = unit_statistics(x, layer.kernel_size, layer.stride, layer.padding, layer.dropout_p, True)
    return mean, torch.rsqrt(var + layer.eps)


@register_grad_sampler(KNConv2d)
def kn_conv_grad_sample(
    layer: KNConv2d, activations: Sequence[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Opacus grad sampler for KNConv2d (formula in the module docstring).

    ``activations`` is ``[x]`` from Opacus' hook, or ``[x, mu, r]`` when
    :func:`attach_kn_statistics` added the statistics the forward pass used.
    """
    x = activations[0].to(backprops.dtype)
    if x.shape[0] == 0:
        return _empty(layer)
    if len(activations) >= 3:
        mean, rstd = activations[1].to(backprops.dtype), activations[2].to(backprops.dtype)
    else:
        mean, rstd = kn_statistics(layer, x)
    g_scaled = backprops * rstd  # (N, O, Ho, Wo) * (N, 1, Ho, Wo)
    out: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        x_pad = F.pad(x, layer.padding)
        gw = conv_weight_grad_sample(x_pad, g_scaled, layer.kernel_size, layer.stride, layer.groups)
        mean_term = (g_scaled * mean).sum(dim=(2, 3))  # (N, O)
        out[layer.weight] = gw - mean_term[:, :, None, None, None]
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


@register_grad_sampler(WSConv2d)
def ws_conv_grad_sample(
    layer: WSConv2d, activations: Sequence[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Opacus grad sampler for the weight-standardized convolution.

    ``out = conv(x, w_hat) + b`` with ``w_hat = (w - mean) * r`` per output channel (biased
    variance, ``r = rsqrt(var + eps)``). The per-sample gradient w.r.t. ``w_hat`` is a plain
    convolution weight gradient; the standardization's backward is sample independent:
    ``dw = r * (g - mean(g) - w_hat * mean(g * w_hat))`` over each output channel's fan-in.
    """
    x = activations[0].to(backprops.dtype)
    if x.shape[0] == 0:
        return _empty(layer)
    out: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        p = layer.padding
        x_pad = F.pad(x, (p, p, p, p))
        k, s = layer.kernel_size, layer.stride
        g_hat = conv_weight_grad_sample(x_pad, backprops, (k, k), (s, s), layer.groups)  # (N, O, I/G, k, k)
        w = layer.weight.detach().to(backprops.dtype)
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, correction=0)
        rstd = torch.rsqrt(var + layer.eps)
        w_hat = ((w - mean) * rstd).unsqueeze(0)
        dims = (2, 3, 4)
        g_mean = g_hat.mean(dim=dims, keepdim=True)
        gw_mean = (g_hat * w_hat).mean(dim=dims, keepdim=True)
        out[layer.weight] = rstd.unsqueeze(0) * (g_hat - g_mean - w_hat * gw_mean)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


# ----------------------------------------------------------------------------------------------------
# hooks: KernelNorm statistics, and attaching/detaching Opacus
# ----------------------------------------------------------------------------------------------------


def _pre_hook(module: KNConv2d, inputs: tuple[Tensor, ...]) -> None:
    acts = getattr(module, "activations", None)
    module._fedkn_pending = len(acts) if acts is not None else 0  # type: ignore[attr-defined]
    if module.training and module.dropout_p > 0 and torch.is_grad_enabled():
        x = inputs[0]
        cuda = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        module._fedkn_rng = (torch.get_rng_state(), cuda)  # type: ignore[attr-defined]
    else:
        module._fedkn_rng = None  # type: ignore[attr-defined]


def _post_hook(module: KNConv2d, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
    acts = getattr(module, "activations", None)
    before = getattr(module, "_fedkn_pending", None)
    rng = getattr(module, "_fedkn_rng", None)
    module._fedkn_pending = None  # type: ignore[attr-defined]
    module._fedkn_rng = None  # type: ignore[attr-defined]
    if acts is None or before is None or len(acts) != before + 1:
        return  # Opacus did not capture this call (eval mode, no_grad, hooks disabled)
    with torch.no_grad():
        mean, rstd = kn_statistics(module, inputs[0].detach(), rng)
    acts[-1] = [*acts[-1], mean, rstd]


def attach_kn_statistics(model: nn.Module) -> list[Any]:
    """Add the statistics hooks to every KNConv2d of ``model`` (after Opacus' hooks). Idempotent."""
    handles = []
    for m in model.modules():
        if isinstance(m, KNConv2d) and not getattr(m, _HOOKS_ATTR, None):
            hs = [m.register_forward_pre_hook(_pre_hook), m.register_forward_hook(_post_hook)]
            setattr(m, _HOOKS_ATTR, hs)
            handles.extend(hs)
    return handles


def attach(
    model: nn.Module, *, loss_reduction: str = "mean", force_functorch: bool = False
) -> GradSampleHooks:
    """Make ``model`` compute per-sample gradients (``p.grad_sample``) on backward, in place.

    Opacus' hooks go on the model's own submodules without wrapping it, so ``model``'s
    ``state_dict`` keys and forward stay as they are (what FedAvg and Flower's clipping mods
    compare). Call :func:`fedkn.privacy.validate.validate_model` first; :func:`detach` undoes this.
    """
    detach(model)
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction=loss_reduction, strict=True,
                            force_functorch=force_functorch)
    attach_kn_statistics(model)
    model._fedkn_grad_sample_hooks = hooks  # type: ignore[attr-defined]
    return hooks


def detach(model: nn.Module) -> None:
    """Remove everything :func:`attach` added (hooks and per-parameter bookkeeping). Idempotent."""
    hooks = model.__dict__.pop("_fedkn_grad_sample_hooks", None)
    if hooks is not None:
        hooks.remove_hooks()
    elif hasattr(model, "autograd_grad_sample_hooks"):
        for h in model.autograd_grad_sample_hooks:
            h.remove()
        del model.autograd_grad_sample_hooks
    for m in model.modules():
        for h in m.__dict__.pop(_HOOKS_ATTR, None) or ():
            h.remove()
        for attr in ("activations", "max_batch_len", "_fedkn_pending", "_fedkn_rng", "ft_compute_sample_grad"):
            m.__dict__.pop(attr, None)
    for p in model.parameters():
        for attr in ("grad_sample", "_forward_counter", "_current_grad_sample", "summed_grad", "_processed"):
            if hasattr(p, attr):
                delattr(p, attr)


def per_sample_gradients(
    model: nn.Module, x: Tensor, y: Tensor, *, loss_fn: Any = None, force_functorch: bool = False
) -> dict[str, Tensor]:
    """Per-sample gradients of ``loss_fn(model(x_i), y_i)`` for every trainable parameter, by name.

    A convenience for tests and benchmarks: attaches, runs one forward/backward with a summed loss,
    collects ``grad_sample`` and detaches again. The model is used in its current train/eval mode
    (Opacus only captures activations in training mode).
    """
    loss_fn = loss_fn or (lambda out, target: F.cross_entropy(out, target, reduction="sum"))
    attach(model, loss_reduction="sum", force_functorch=force_functorch)
    try:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        out = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                gs = p.grad_sample
                if gs is None:
                    raise FedknError(f"no per-sample gradient for parameter '{name}'")
                out[name] = gs.detach().clone()
        return out
    finally:
        model.zero_grad(set_to_none=True)
        detach(model)


__all__ = [
    "METHODS",
    "attach",
    "attach_kn_statistics",
    "conv_weight_grad_sample",
    "detach",
    "kn_conv_grad_sample",
    "kn_statistics",
    "per_sample_gradients",
    "set_method",
    "ws_conv_grad_sample",
]
