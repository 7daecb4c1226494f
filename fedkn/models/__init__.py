"""Model registry and :func:`build`, the one way fedkn constructs a network.

Every family is written once against a :class:`~fedkn.nn.norms.Norm`; ``build`` resolves the norm
name with the model's paper defaults (KernelNorm dropout, GroupNorm grouping) and rejects
combinations that cannot exist (a KNResNet without KernelNorm, a stand-alone-norm model with
KernelNorm, an input too small for the model's down-sampling) with one clear line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from fedkn.errors import FedknError
from fedkn.models.knresnet import knresnet
from fedkn.models.resnet import preact_resnet18, resnet
from fedkn.models.small import resnet8, vgg6
from fedkn.nn.norms import NORMS, Norm, NormLike, check_norm_name, get_norm

ModelFn = Callable[[Norm, int, int, float, bool], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    fn: ModelFn
    description: str
    #: Norm names the model can be built with.
    norms: tuple[str, ...]
    #: Paper defaults for norm options (e.g. KernelNorm dropout), overridable by the caller.
    norm_defaults: Mapping[str, Any] = field(default_factory=dict)


_NON_KN = tuple(n for n in NORMS if n != "kn")
_ALL = tuple(NORMS)
#: Pre-activation models need a stand-alone norm layer (``norm.layer``): not kn, not nf.
_WITH_LAYER = tuple(n for n, s in NORMS.items() if s.layer is not None)

MODELS: dict[str, ModelSpec] = {
    "resnet8": ModelSpec(resnet8, "ResNet-8 of the KernelNorm DP paper", _ALL, {"dropout_p": 0.1, "head_dropout_p": 0.25}),
    "vgg6": ModelSpec(vgg6, "VGG-6: 4 conv + 2 linear layers", _ALL, {"dropout_p": 0.1, "head_dropout_p": 0.25}),
    "knresnet18": ModelSpec(partial(knresnet, 18), "KNResNet-18 (KernelNorm only)", ("kn",), {"dropout_p": 0.05}),
    "knresnet34": ModelSpec(partial(knresnet, 34), "KNResNet-34 (KernelNorm only)", ("kn",), {"dropout_p": 0.05}),
    "knresnet50": ModelSpec(partial(knresnet, 50), "KNResNet-50 (KernelNorm only)", ("kn",), {"dropout_p": 0.05}),
    "resnet18": ModelSpec(partial(resnet, 18), "ResNet-18", _NON_KN),
    "resnet34": ModelSpec(partial(resnet, 34), "ResNet-34", _NON_KN),
    "resnet50": ModelSpec(partial(resnet, 50), "ResNet-50 (bottleneck)", _NON_KN),
    "preactresnet18": ModelSpec(preact_resnet18, "PreactResNet-18", _WITH_LAYER),
}


def build(
    name: str,
    norm: NormLike = "kn",
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    *,
    high_res: bool = False,
    norm_options: Mapping[str, Any] | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> nn.Module:
    """Build model ``name`` with normalization ``norm`` (a registry name or a resolved Norm).

    ``width`` multiplies every channel count, so a CPU run can use e.g. 0.25. GroupNorm keeps the
    number of groups it has at width 1 (group size scales with width) so a narrow GN model does not
    silently become LayerNorm. ``image_size``, when given, is checked with a dry forward pass so an
    input too small for the model's down-sampling fails here, not in round 1.
    """
    spec = MODELS.get(name)
    if spec is None:
        raise FedknError(f"unknown model '{name}'; valid models: {', '.join(MODELS)}")
    norm_name = norm.name if isinstance(norm, Norm) else norm
    check_norm_name(norm_name)
    if norm_name not in spec.norms:
        hint = "use knresnet18/34/50 or resnet8/vgg6 for KernelNorm" if norm_name == "kn" else "use resnet8/vgg6 or resnet18/34/50"
        raise FedknError(f"model '{name}' cannot use norm '{norm_name}' (it supports {', '.join(spec.norms)}); {hint}")
    if not width > 0:
        raise FedknError(f"width must be > 0, got {width}")
    if num_classes < 1 or in_channels < 1:
        raise FedknError(f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}")
    defaults = dict(spec.norm_defaults)
    if norm_name in ("gn", "wsgn"):
        defaults["group_size"] = max(1, round(32 * width))
    resolved = norm if isinstance(norm, Norm) else get_norm(norm_name, defaults, **(norm_options or {}))
    model = resolved.finalize(spec.fn(resolved, num_classes, in_channels, width, high_res))
    if image_size is not None:
        _check_input_size(model, name, in_channels, image_size)
    return model


def _check_input_size(model: nn.Module, name: str, in_channels: int, image_size: int | tuple[int, int]) -> None:
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, h, w))
    except RuntimeError as err:
        raise FedknError(f"model '{name}' cannot take {h}x{w} inputs (too small for its down-sampling): {str(err).splitlines()[0]}") from None
    finally:
        model.train(was_training)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (what FedAvg sends each round, buffers aside)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODELS", "ModelSpec", "build", "count_parameters"]
