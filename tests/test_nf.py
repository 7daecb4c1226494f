"""The normalization-free norm (nf): scaled WS convolutions, scaled residuals, batch size 1, DP-SGD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedkn.data import load_dataset, preprocess_for
from fedkn.errors import FedknError
from fedkn.models import build
from fedkn.nn.nf import RELU_GAMMA, NFResidual, ScaledWSConv2d
from fedkn.nn.norms import NF_AGC_CLIP
from fedkn.privacy import DPSettings, make_private
from fedkn.train import train_local

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def test_scaled_ws_conv_is_the_papers_formula():
    torch.manual_seed(0)
    layer = ScaledWSConv2d(3, 5, 3, 1, 1).double()
    with torch.no_grad():
        layer.affine.gain.uniform_(0.5, 2.0)
        layer.affine.bias.normal_()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = layer.conv.weight
    fan_in = 3 * 9
    std = (w.flatten(1).var(dim=1, unbiased=False) + 1e-5).sqrt().view(-1, 1, 1, 1)  # eps 1e-5 on the variance
    w_hat = layer.affine.gain.view(-1, 1, 1, 1) * RELU_GAMMA * (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (std * math.sqrt(fan_in))
    expected = F.conv2d(x, w_hat, layer.affine.bias, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)


def test_unit_variance_in_gives_unit_variance_out_at_any_weight_scale():
    torch.manual_seed(0)
    layer = ScaledWSConv2d(64, 64, 3, 1, 0)
    layer.set_gamma(1.0)
    x = torch.randn(8, 64, 16, 16)
    with torch.no_grad():
        for scale in (0.1, 1.0, 100.0):
            layer.conv.weight.normal_(std=scale)
            assert layer(x).var().item() == pytest.approx(1.0, rel=0.15)


def test_residual_scales_follow_the_nf_resnet_recursion():
    alpha = 0.2
    model = build("resnet18", "nf", in_channels=1, width=0.125)
    blocks = [m for m in model.modules() if isinstance(m, NFResidual)]
    assert len(blocks) == 8 and all(b.alpha == alpha for b in blocks)
    transitions = [b.shortcut is not None for b in blocks]
    assert transitions == [False, False, True, False, True, False, True, False]
    expected = [1.0, 1 + alpha**2] + [1 + 2 * alpha**2, 1 + alpha**2] * 3  # reset to 1 + alpha^2 at each transition
    for b, var in zip(blocks, expected):
        assert b.beta == pytest.approx(math.sqrt(var))
    convs = [m for m in model.modules() if isinstance(m, ScaledWSConv2d)]
    assert convs[0].affine.scale == pytest.approx(1 / math.sqrt(convs[0].fan_in))  # the stem sees the image
    assert all(c.affine.scale == pytest.approx(RELU_GAMMA / math.sqrt(c.fan_in)) for c in convs[1:])
    # resnet8: its two residual blocks have identity shortcuts.
    small = [m for m in build("resnet8", "nf", in_channels=1, width=0.125).modules() if isinstance(m, NFResidual)]
    assert [b.beta for b in small] == pytest.approx([1.0, math.sqrt(1 + alpha**2)])


def test_nf_has_no_normalization_layer_and_no_stand_alone_layer():
    model = build("resnet8", "nf", in_channels=1, width=0.125)
    norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    assert not any(isinstance(m, norm_types) for m in model.modules())
    assert not list(model.buffers())
    with pytest.raises(FedknError, match="model 'preactresnet18' cannot use norm 'nf'"):
        build("preactresnet18", "nf")
    with pytest.raises(FedknError, match="nf alpha"):
        build("resnet8", "nf", norm_options={"alpha": 0.0})


def test_nf_trains_under_dp_sgd_with_agc():
    ds = load_dataset("digits", "train")
    pre = preprocess_for(ds, normalize=True, augment=False)
    torch.manual_seed(0)
    model = build("resnet8", "nf", in_channels=1, width=0.0625)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = np.arange(40)
    session = make_private(model, num_samples=len(idx), batch_size=8,
                           settings=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3))
    try:
        res = train_local(model, ds, idx, batch_size=8, lr=0.05, device="cpu", preprocess=pre,
                          generator=torch.Generator().manual_seed(0), agc_clip=NF_AGC_CLIP,
                          steps=session.steps_per_round, make_optimizer_fn=session.make_optimizer,
                          make_batches_fn=session.make_batches, train_step_fn=session.train_step)
    finally:
        session.close()
    assert res.steps == session.steps_taken == 5 and math.isfinite(res.loss)
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)
