"""The normalization registry: one entry per norm, so adding a norm is adding one entry.

Models never instantiate a normalization layer themselves. They ask a :class:`Norm` for

- ``conv(in, out, kernel, stride, padding)``: a convolution together with its normalization. For
  BatchNorm/GroupNorm/LayerNorm this is ``Conv2d -> Norm`` (the conv has no bias, the norm's affine
  shift replaces it); for KernelNorm it is the fused :class:`KNConv2d`, which normalizes the
  convolution's *input* windows; for ``none`` a plain biased Conv2d.
- ``layer(channels)``: a stand-alone normalization over channels, for pre-activation blocks.
  KernelNorm has none (it only exists around a convolution), so such models reject ``kn``.
- ``head()``: what a model puts after its last convolution. KernelNorm models end with a 1x1
  KernelNorm (their last conv output is otherwise un-normalized); the others need nothing there.
- ``residual(body, shortcut)``: a residual block, ``body(x) + shortcut(x)`` for every norm but
  ``nf``, whose normalization-free blocks scale their branches (:class:`~fedkn.nn.nf.NFResidual`).
- ``finalize(model)``: called once on the built model, for what only the whole network knows
  (``nf``: each residual block's expected signal scale).

Options (dropout of KernelNorm, group size of GroupNorm) are bound when the entry is resolved with
:func:`get_norm`; models pass their paper defaults, which explicit options override.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from fedkn.errors import FedknError
from fedkn.nn.kernelnorm import IMPLS, KernelNorm2d, KNConv2d, Padding
from fedkn.nn.nf import NFResidual, ScaledWSConv2d, set_signal_scales
from fedkn.nn.wsconv import WSConv2d


def group_count(channels: int, group_size: int | None = 32, groups: int | None = None) -> int:
    """Number of GroupNorm groups for ``channels``.

    With ``groups`` given it must divide ``channels``. Otherwise the papers' group size (32 channels
    per group) is used, falling back to the nearest divisor so narrow (width-multiplied) layers still
    get a valid GroupNorm; a layer narrower than one group becomes LayerNorm (1 group).
    """
    if groups is not None:
        if groups < 1 or channels % groups:
            raise FedknError(f"GroupNorm groups={groups} does not divide {channels} channels; pick a divisor")
        return groups
    if group_size is None or group_size < 1:
        raise FedknError(f"GroupNorm group_size must be a positive int, got {group_size!r}")
    target = max(1, channels // group_size)
    return max(g for g in range(1, target + 1) if channels % g == 0)


def _plain_conv(in_ch: int, out_ch: int, kernel: int, stride: int, padding: Padding, bias: bool) -> nn.Conv2d:
    if not isinstance(padding, int):
        raise FedknError("asymmetric padding is only supported by KernelNorm convolutions")
    return nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=bias)


Options = Mapping[str, Any]


class Residual(nn.Module):
    """``body(x) + shortcut(x)``: every norm's residual block but ``nf``'s (see :meth:`Norm.residual`)."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = nn.Identity() if shortcut is None else shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.shortcut(x)


@dataclass(frozen=True)
class NormSpec:
    """A registry entry: how to build one normalization, before its options are bound."""

    description: str
    #: KernelNorm models take raw [0,1] pixels (the reference code does); the others normalized ones.
    raw_pixels: bool
    #: False when a sample's output depends on other samples of the batch (rules out DP-SGD).
    batch_independent: bool
    defaults: Options
    #: Stand-alone layer over ``channels``; None when the norm exists only around a convolution.
    layer: Callable[[int, Options], nn.Module] | None
    #: Convolution + norm; None means "bias-free Conv2d followed by ``layer``".
    conv: Callable[[int, int, int, int, Padding, Options], nn.Module] | None = None
    #: After the last convolution; None means identity.
    head: Callable[[Options], nn.Module] | None = None
    #: ``(body, shortcut or None, options)`` -> residual block; None means ``body(x) + shortcut(x)``.
    residual: Callable[[nn.Module, nn.Module | None, Options], nn.Module] | None = None
    #: Applied once to the built model; None means nothing to do.
    finalize: Callable[[nn.Module, Options], None] | None = None
    #: Adaptive gradient clipping ratio local training uses by default (config ``agc-clip``); 0 = off.
    agc_clip: float = 0.0


@dataclass(frozen=True)
class Norm:
    """A resolved registry entry: a norm name plus its bound options. Models build layers from it."""

    name: str
    spec: NormSpec
    options: Options = field(default_factory=dict)

    @property
    def raw_pixels(self) -> bool:
        return self.spec.raw_pixels

    @property
    def batch_independent(self) -> bool:
        return self.spec.batch_independent

    def conv(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: Padding = 0) -> nn.Module:
        """A convolution with this normalization (see the module docstring)."""
        if self.spec.conv is not None:
            return self.spec.conv(in_ch, out_ch, kernel, stride, padding, self.options)
        return nn.Sequential(_plain_conv(in_ch, out_ch, kernel, stride, padding, bias=False), self.layer(out_ch))

    def layer(self, channels: int) -> nn.Module:
        """A stand-alone normalization over ``channels`` feature maps."""
        if self.spec.layer is None:
            raise FedknError(
                f"norm '{self.name}' has no stand-alone layer (it lives inside its convolutions); "
                "use a model built from convolutions, e.g. resnet8 or resnet18"
            )
        return self.spec.layer(channels, self.options)

    def head(self) -> nn.Module:
        """The layer after a model's last convolution (a 1x1 KernelNorm for kn)."""
        return nn.Identity() if self.spec.head is None else self.spec.head(self.options)

    def residual(self, body: nn.Module, shortcut: nn.Module | None = None) -> nn.Module:
        """A residual block around ``body`` (identity shortcut when ``shortcut`` is None)."""
        if self.spec.residual is None:
            return Residual(body, shortcut)
        return self.spec.residual(body, shortcut, self.options)

    def finalize(self, model: nn.Module) -> nn.Module:
        """Whole-model set-up of this norm (see the module docstring); returns ``model``."""
        if self.spec.finalize is not None:
            self.spec.finalize(model, self.options)
        return model


def _group_norm(channels: int, o: Options) -> nn.Module:
    return nn.GroupNorm(group_count(channels, o.get("group_size", 32), o.get("groups")), channels)


def _ws_conv(in_ch: int, out_ch: int, k: int, s: int, p: Padding, o: Options) -> nn.Module:
    if not isinstance(p, int):
        raise FedknError("asymmetric padding is only supported by KernelNorm convolutions")
    return nn.Sequential(WSConv2d(in_ch, out_ch, k, s, p), _group_norm(out_ch, o))


def _scaled_ws_conv(in_ch: int, out_ch: int, k: int, s: int, p: Padding, o: Options) -> nn.Module:
    if not isinstance(p, int):
        raise FedknError("asymmetric padding is only supported by KernelNorm convolutions")
    return ScaledWSConv2d(in_ch, out_ch, k, s, p)


#: AGC's unit-wise clipping ratio for ``nf`` (Brock et al. 2021, NFNets; see ``fedkn.agc``).
NF_AGC_CLIP = 0.01


#: The registry. Option defaults here are generic; models pass their paper defaults to get_norm.
NORMS: dict[str, NormSpec] = {
    "kn": NormSpec(
        "KernelNorm: normalizes each convolution window by its own statistics",
        raw_pixels=True,
        batch_independent=True,
        defaults={"dropout_p": 0.05, "head_dropout_p": None, "impl": "auto"},
        layer=None,
        conv=lambda i, o, k, s, p, opt: KNConv2d(i, o, k, s, p, dropout_p=opt["dropout_p"], impl=opt["impl"]),
        head=lambda opt: KernelNorm2d(1, dropout_p=opt["head_dropout_p"]),
    ),
    "bn": NormSpec("BatchNorm2d: batch statistics and running averages", False, False, {},
                   layer=lambda c, o: nn.BatchNorm2d(c)),
    "gn": NormSpec("GroupNorm, 32 channels per group at width 1 (group count kept under a width multiplier)", False, True,
                   {"group_size": 32, "groups": None}, layer=_group_norm),
    "ln": NormSpec("LayerNorm over C,H,W (GroupNorm with 1 group)", False, True, {},
                   layer=lambda c, o: nn.GroupNorm(1, c)),
    "wsgn": NormSpec("weight-standardized convolution + GroupNorm", False, True,
                     {"group_size": 32, "groups": None}, layer=_group_norm, conv=_ws_conv),
    "none": NormSpec("no normalization (biased convolutions)", False, True, {},
                     layer=lambda c, o: nn.Identity(),
                     conv=lambda i, o, k, s, p, opt: _plain_conv(i, o, k, s, p, bias=True)),
    "nf": NormSpec("normalization-free (FedWon/NF-ResNets): scaled weight-standardized convolutions, "
                   "scaled residuals, adaptive gradient clipping", False, True, {"alpha": 0.2},
                   layer=None, conv=_scaled_ws_conv,
                   residual=lambda body, shortcut, opt: NFResidual(body, shortcut, alpha=opt["alpha"]),
                   finalize=lambda model, opt: set_signal_scales(model), agc_clip=NF_AGC_CLIP),
}


def check_norm_name(name: str, *, also: Sequence[str] = (), where: str = "") -> None:
    """The one check of a norm name: registered here (or one of ``also``, the config's rule norms),
    else an error naming every valid name. ``where`` says where it was typed."""
    if name not in NORMS and name not in also:
        raise FedknError(f"unknown norm '{name}'{where}; valid norms: {', '.join([*NORMS, *also])}")


def get_norm(name: str | Norm, defaults: Options | None = None, **options: Any) -> Norm:
    """Resolve a norm by name. ``defaults`` (a model's paper values) yield to explicit ``options``.

    Unknown names and options raise :class:`FedknError` listing what is valid.
    """
    if isinstance(name, Norm):
        return name
    check_norm_name(name)
    spec = NORMS[name]
    unknown = set(options) - set(spec.defaults)
    if unknown:
        valid = ", ".join(spec.defaults) or "none"
        raise FedknError(f"unknown option(s) {', '.join(sorted(unknown))} for norm '{name}'; valid options: {valid}")
    resolved = dict(spec.defaults)
    resolved.update({k: v for k, v in (defaults or {}).items() if k in spec.defaults})
    resolved.update(options)
    if "dropout_p" in resolved:
        p = resolved["dropout_p"]
        if not 0.0 <= p < 1.0:
            raise FedknError(f"KernelNorm dropout_p must be in [0, 1), got {p}")
        if resolved["head_dropout_p"] is None:
            resolved["head_dropout_p"] = min(5 * p, 0.25)
    if "impl" in resolved and resolved["impl"] not in IMPLS:
        raise FedknError(f"KernelNorm impl must be one of {', '.join(IMPLS)}, got {resolved['impl']!r}")
    if "alpha" in resolved and not 0.0 < resolved["alpha"] <= 1.0:
        raise FedknError(f"nf alpha (the residual branch scale) must be in (0, 1], got {resolved['alpha']}")
    return Norm(name, spec, resolved)


NormLike = str | Norm
