"""ResNet-18/34/50 and PreactResNet-18 with any registry norm except KernelNorm.

Written once against :class:`Norm`: ``norm.conv`` gives conv+norm for the post-activation ResNets,
``norm.layer`` the stand-alone norm of the pre-activation blocks. Low resolution (default) is the
CIFAR stem (3x3, stride 1, no max-pool); high resolution the ImageNet stem (7x7/2 + max-pool).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from fedkn.models.blocks import Classifier, init_weights, scaled
from fedkn.nn.norms import Norm


def _basic(norm: Norm, in_ch: int, ch: int, stride: int) -> nn.Module:
    return nn.Sequential(norm.conv(in_ch, ch, 3, stride, 1), nn.ReLU(), norm.conv(ch, ch, 3, 1, 1))


def _bottleneck(norm: Norm, in_ch: int, ch: int, stride: int) -> nn.Module:
    return nn.Sequential(
        norm.conv(in_ch, ch, 1), nn.ReLU(),
        norm.conv(ch, ch, 3, stride, 1), nn.ReLU(),
        norm.conv(ch, ch * 4, 1),
    )


def _postact_block(norm: Norm, body: Callable[..., nn.Module], expansion: int, in_ch: int, ch: int, stride: int) -> nn.Module:
    """relu(body(x) + shortcut(x)); the shortcut is a 1x1 conv+norm where the shape changes."""
    out = ch * expansion
    shortcut = norm.conv(in_ch, out, 1, stride, 0) if stride != 1 or in_ch != out else None
    return nn.Sequential(norm.residual(body(norm, in_ch, ch, stride), shortcut), nn.ReLU())


class PreactBlock(nn.Module):
    """norm -> relu -> conv, twice; the shortcut branches off after the first norm+relu."""

    def __init__(self, norm: Norm, in_ch: int, ch: int, stride: int) -> None:
        super().__init__()
        self.pre = nn.Sequential(norm.layer(in_ch), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False), norm.layer(ch), nn.ReLU(),
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False),
        )
        self.shortcut = nn.Conv2d(in_ch, ch, 1, stride, bias=False) if stride != 1 or in_ch != ch else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.pre(x)
        shortcut = x if self.shortcut is None else self.shortcut(out)
        return self.body(out) + shortcut


#: depth -> (block body, channel expansion, blocks per stage)
_LAYOUT = {18: (_basic, 1, (2, 2, 2, 2)), 34: (_basic, 1, (3, 4, 6, 3)), 50: (_bottleneck, 4, (3, 4, 6, 3))}


def _stem(norm: Norm, in_channels: int, out: int, high_res: bool, with_norm: bool = True) -> list[nn.Module]:
    kernel, stride, pad = (7, 2, 3) if high_res else (3, 1, 1)
    conv = norm.conv(in_channels, out, kernel, stride, pad) if with_norm else nn.Conv2d(
        in_channels, out, kernel, stride, pad, bias=False
    )
    layers = [conv, nn.ReLU()] if with_norm else [conv]
    return layers + ([nn.MaxPool2d(3, 2, 1)] if high_res else [])


def resnet(depth: int, norm: Norm, num_classes: int, in_channels: int, width: float, high_res: bool) -> nn.Module:
    body, expansion, counts = _LAYOUT[depth]
    widths = [scaled(c, width) for c in (64, 128, 256, 512)]
    layers = _stem(norm, in_channels, widths[0], high_res)
    in_ch = widths[0]
    for stage, (ch, n) in enumerate(zip(widths, counts)):
        for i in range(n):
            layers.append(_postact_block(norm, body, expansion, in_ch, ch, 2 if stage > 0 and i == 0 else 1))
            in_ch = ch * expansion
    model = Classifier(nn.Sequential(*layers), nn.Linear(in_ch, num_classes))
    init_weights(model)
    return model


def preact_resnet18(norm: Norm, num_classes: int, in_channels: int, width: float, high_res: bool) -> nn.Module:
    widths = [scaled(c, width) for c in (64, 128, 256, 512)]
    layers = _stem(norm, in_channels, widths[0], high_res, with_norm=False)
    in_ch = widths[0]
    for stage, ch in enumerate(widths):
        for i in range(2):
            layers.append(PreactBlock(norm, in_ch, ch, 2 if stage > 0 and i == 0 else 1))
            in_ch = ch
    layers += [norm.layer(in_ch), nn.ReLU()]
    model = Classifier(nn.Sequential(*layers), nn.Linear(in_ch, num_classes))
    init_weights(model)
    return model
