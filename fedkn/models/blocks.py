"""Building blocks shared by the model families, each written once against a :class:`Norm`."""

from __future__ import annotations

from torch import Tensor, nn

from fedkn.nn.kernelnorm import KNConv2d, Padding
from fedkn.nn.norms import Norm, Residual  # noqa: F401 - Residual: re-exported for the model families


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier (at least 1), so CPU-sized variants keep the shape."""
    return max(1, round(channels * width))


class Classifier(nn.Module):
    """features -> (optional) adaptive pooling -> flatten -> linear layers.

    Splitting every model into ``features`` and ``classifier`` keeps FedAvg/FedBN key names uniform
    and lets tests probe feature shapes.
    """

    def __init__(self, features: nn.Module, classifier: nn.Module, pool: int = 1) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) convolutions, zero biases; the papers' initialization.

    KNConv2d initializes itself the same way in ``reset_parameters``.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def kn_conv(norm: Norm, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: Padding = 0) -> KNConv2d:
    """A KNConv2d with the dropout and ``impl`` bound in ``norm`` (KNResNets are KernelNorm-only by design)."""
    return KNConv2d(in_ch, out_ch, kernel, stride, padding, dropout_p=norm.options["dropout_p"], impl=norm.options["impl"])
