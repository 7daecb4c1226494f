"""Layers and the normalization registry. Knows nothing of Flower or datasets."""

from fedkn.nn.kernelnorm import IMPLS, KernelNorm2d, KNConv2d
from fedkn.nn.norms import NORMS, Norm, NormLike, NormSpec, get_norm, group_count
from fedkn.nn.wsconv import WSConv2d

__all__ = ["IMPLS", "NORMS", "KNConv2d", "KernelNorm2d", "Norm", "NormLike", "NormSpec", "WSConv2d", "get_norm", "group_count"]
