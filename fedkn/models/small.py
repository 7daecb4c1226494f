"""The small models of the FL/DP papers, in every norm: ResNet-8 and VGG-6.

One skeleton per model; the norm decides what each ``norm.conv`` is (KNConv2d for kn, conv+norm
otherwise) and ``norm.head()`` adds the KernelNorm 1x1 that KN models end with.
"""

from __future__ import annotations

from torch import nn

from fedkn.models.blocks import Classifier, init_weights, scaled
from fedkn.nn.norms import Norm


def _block(norm: Norm, in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3 conv (with its norm), then activation."""
    return nn.Sequential(norm.conv(in_ch, out_ch, 3, 1, 1), nn.ReLU())


def resnet8(norm: Norm, num_classes: int, in_channels: int, width: float, high_res: bool = False) -> nn.Module:
    """block(3->64); block(64->128)+pool; res(128); block(128->256)+pool; res(256); pool; head; 2x2 pool; linear."""
    c1, c2, c3 = (scaled(c, width) for c in (64, 128, 256))
    features = nn.Sequential(
        _block(norm, in_channels, c1),
        _block(norm, c1, c2), nn.MaxPool2d(2),
        norm.residual(nn.Sequential(_block(norm, c2, c2), _block(norm, c2, c2))),
        _block(norm, c2, c3), nn.MaxPool2d(2),
        norm.residual(nn.Sequential(_block(norm, c3, c3), _block(norm, c3, c3))),
        nn.MaxPool2d(2),
        norm.head(),
    )
    model = Classifier(features, nn.Linear(c3 * 4, num_classes), pool=2)
    init_weights(model)
    return model


def vgg6(norm: Norm, num_classes: int, in_channels: int, width: float, high_res: bool = False) -> nn.Module:
    """Four 3x3 conv blocks (64, 128, 256, 256; max-pool after 1st, 2nd, 4th) and two linear layers."""
    c1, c2, c3, fc = (scaled(c, width) for c in (64, 128, 256, 256))
    features = nn.Sequential(
        _block(norm, in_channels, c1), nn.MaxPool2d(2),
        _block(norm, c1, c2), nn.MaxPool2d(2),
        _block(norm, c2, c3),
        _block(norm, c3, c3), nn.MaxPool2d(2),
        norm.head(),
    )
    classifier = nn.Sequential(nn.Linear(c3, fc), nn.ReLU(), nn.Linear(fc, num_classes))
    model = Classifier(features, classifier, pool=1)
    init_weights(model)
    return model
