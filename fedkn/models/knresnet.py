"""KNResNet-18/34/50: the papers' KernelNorm ResNets, built from KNConv2d only (spec section 'KNResNet').

Blocks are pre-activation style: ``res(c, m)`` is relu -> KNConv c->m 2x2 pad 1 -> relu -> KNConv
m->c 2x2 pad 0, plus the identity; 2x2 kernels with asymmetric padding in the transitions keep the
spatial bookkeeping of the authors' models.
"""

from __future__ import annotations

from torch import nn

from fedkn.models.blocks import Classifier, Residual, init_weights, kn_conv, scaled
from fedkn.nn.kernelnorm import KernelNorm2d, Padding
from fedkn.nn.norms import Norm

LEFT_TOP: Padding = (1, 0, 1, 0)
RIGHT_BOTTOM: Padding = (0, 1, 0, 1)


def _res(norm: Norm, c: int, m: int) -> Residual:
    return Residual(nn.Sequential(nn.ReLU(), kn_conv(norm, c, m, 2, 1, 1), nn.ReLU(), kn_conv(norm, m, c, 2, 1, 0)))


def _bottleneck(norm: Norm, c: int, m: int, outer_kernel: int = 2) -> Residual:
    pad_in, pad_out = (1, 0) if outer_kernel == 2 else (0, 0)
    return Residual(
        nn.Sequential(
            nn.ReLU(), kn_conv(norm, c, m, outer_kernel, 1, pad_in),
            nn.ReLU(), kn_conv(norm, m, m, 3, 1, 1),
            nn.ReLU(), kn_conv(norm, m, c, outer_kernel, 1, pad_out),
        )
    )


def _trans(norm: Norm, a: int, b: int, padding: Padding, kernel: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), kn_conv(norm, a, b, kernel, 1, padding), nn.MaxPool2d(2))


def _stem(norm: Norm, in_channels: int, out: int, high_res: bool) -> nn.Sequential:
    if high_res:
        return nn.Sequential(kn_conv(norm, in_channels, out, 7, 2, 3), nn.MaxPool2d(3, 2, 1))
    return nn.Sequential(kn_conv(norm, in_channels, out, 3, 1, 1))


def _head(norm: Norm, c: int, out: int, high_res: bool, num_classes: int) -> tuple[list[nn.Module], nn.Module]:
    """maxpool 2; relu -> KNConv c->out 2x2 (pad 1, or 0 at high resolution); KernelNorm 1x1; relu."""
    layers = [
        nn.MaxPool2d(2), nn.ReLU(), kn_conv(norm, c, out, 2, 1, 0 if high_res else 1),
        KernelNorm2d(1, dropout_p=norm.options["head_dropout_p"]), nn.ReLU(),
    ]
    return layers, nn.Linear(out, num_classes)


#: Per depth: (stem width, [(blocks, channels, inner), transition to next channels] ..., head width).
_BASIC = {
    18: (64, [(2, 64, 256, 256), (2, 256, 256, 512), (1, 512, 512, 724), (1, 724, 724, None)], 512),
    34: (64, [(4, 64, 256, 256), (5, 256, 320, 512), (3, 512, 640, 512), (2, 512, 843, None)], 512),
}


def knresnet(depth: int, norm: Norm, num_classes: int, in_channels: int, width: float, high_res: bool) -> nn.Module:
    """KNResNet-18/34 (basic 2x2 blocks) or KNResNet-50 (bottlenecks) at a width multiplier."""
    w = lambda c: scaled(c, width)  # local shorthand keeps the tables readable
    if depth == 50:
        return _knresnet50(norm, num_classes, in_channels, w, high_res)
    stem, stages, head = _BASIC[depth]
    third_pad = (2, 1, 2, 1) if high_res else LEFT_TOP
    trans_pads = [LEFT_TOP, RIGHT_BOTTOM, third_pad]
    layers: list[nn.Module] = [*_stem(norm, in_channels, w(stem), high_res)]
    for i, (blocks, c, m, nxt) in enumerate(stages):
        layers += [_res(norm, w(c), w(m)) for _ in range(blocks)]
        if nxt is not None:
            layers.append(_trans(norm, w(c), w(nxt), trans_pads[i]))
    tail, classifier = _head(norm, w(stages[-1][1]), w(head), high_res, num_classes)
    model = Classifier(nn.Sequential(*layers, *tail), classifier)
    init_weights(model)
    return model


def _knresnet50(norm: Norm, num_classes: int, in_channels: int, w, high_res: bool) -> nn.Module:
    layers: list[nn.Module] = [*_stem(norm, in_channels, w(256), high_res)]
    layers += [_bottleneck(norm, w(256), w(64)) for _ in range(4)]
    layers.append(_trans(norm, w(256), w(512), LEFT_TOP))
    layers += [_bottleneck(norm, w(512), w(128)) for _ in range(5)]
    layers.append(_trans(norm, w(512), w(810), RIGHT_BOTTOM))
    layers += [_bottleneck(norm, w(810), w(201)) for _ in range(4)]
    layers.append(_trans(norm, w(810), w(2048), 0, kernel=1))
    layers += [_bottleneck(norm, w(2048), w(512), outer_kernel=1) for _ in range(2)]
    layers += [KernelNorm2d(1, dropout_p=norm.options["head_dropout_p"]), nn.ReLU()]
    model = Classifier(nn.Sequential(*layers), nn.Linear(w(2048), num_classes))
    init_weights(model)
    return model
