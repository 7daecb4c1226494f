"""fedkn.nn.batchnorm: the one answer to "is this layer BatchNorm" (FedBN, FixBN, DP-SGD, batch size 1)."""

from __future__ import annotations

import pytest
from torch import nn

from fedkn.models import build
from fedkn.nn.batchnorm import batchnorm_modules, has_batchnorm, is_batchnorm
from fedkn.nn.kernelnorm import KNConv2d


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4), nn.SyncBatchNorm(4)])
def test_every_batchnorm_kind_is_batchnorm(layer: nn.Module) -> None:
    assert is_batchnorm(layer)


@pytest.mark.parametrize("layer", [nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.InstanceNorm2d(4), KNConv2d(4, 4, 2)])
def test_other_norms_are_not(layer: nn.Module) -> None:
    assert not is_batchnorm(layer)


@pytest.mark.parametrize(("norm", "expected"), [("bn", True), ("kn", False), ("gn", False), ("nf", False)])
def test_models_by_norm(norm: str, expected: bool) -> None:
    model = build("resnet8", norm=norm, num_classes=10, in_channels=1, width=0.25)
    names = [name for name, _ in batchnorm_modules(model)]
    assert has_batchnorm(model) is expected and bool(names) is expected
    assert all(is_batchnorm(model.get_submodule(n)) for n in names)
