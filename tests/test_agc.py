"""Adaptive gradient clipping (fedkn.agc) and the agc-clip config key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedkn import agc
from fedkn.config import RunConfig
from fedkn.data import load_dataset, preprocess_for
from fedkn.errors import FedknError
from fedkn.models import build
from fedkn.nn.norms import NF_AGC_CLIP
from fedkn.train import make_optimizer, train_local


def test_gradient_above_the_ratio_is_scaled_to_it_and_one_below_is_untouched():
    w = nn.Parameter(torch.tensor([[3.0, 4.0], [0.6, 0.8]]))  # unit (row) norms 5 and 1: limits 0.5 and 0.1
    w.grad = torch.tensor([[0.6, 0.8], [0.0, 0.05]])  # unit gradient norms 1.0 (above 0.5) and 0.05 (below 0.1)
    agc.clip_([w], 0.1)
    torch.testing.assert_close(w.grad[0], torch.tensor([0.3, 0.4]))  # scaled to norm 0.5, same direction
    torch.testing.assert_close(w.grad[1], torch.tensor([0.0, 0.05]), rtol=0, atol=0)  # as it was


def test_units_are_output_channels_and_vectors_are_one_unit():
    conv = nn.Parameter(torch.ones(2, 3, 3, 3))  # each output channel: norm sqrt(27)
    conv.grad = torch.zeros(2, 3, 3, 3)
    conv.grad[0] = 10.0  # far above 0.01 * sqrt(27)
    conv.grad[1] = 1e-4  # below
    before = conv.grad[1].clone()
    bias = nn.Parameter(torch.zeros(4))  # zero weights: the floor eps = 1e-3 applies
    bias.grad = torch.ones(4)
    agc.clip_([conv, bias], 0.01)
    assert torch.linalg.vector_norm(conv.grad[0]).item() == pytest.approx(0.01 * 27**0.5)
    torch.testing.assert_close(conv.grad[1], before, rtol=0, atol=0)
    assert torch.linalg.vector_norm(bias.grad).item() == pytest.approx(0.01 * agc.EPS)


def test_attached_agc_clips_every_step_but_not_the_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    opt = make_optimizer(model, lr=1.0, momentum=0.0, weight_decay=0.0)
    agc.attach(opt, model, 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 4, dtype=torch.float64)).square().sum().mul(100).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    first_w, first_b, last_w, last_b = (b - p.detach() for b, p in zip(before, model.parameters()))
    # lr 1, no momentum: the update is the gradient the step used.
    limit = agc.unitwise_norm(before[0]).clamp_min(agc.EPS) * 1e-3
    assert (agc.unitwise_norm(first_w) <= limit * (1 + 1e-9)).all()
    assert agc.unitwise_norm(first_b) <= agc.unitwise_norm(before[1]).clamp_min(agc.EPS) * 1e-3 * (1 + 1e-9)
    torch.testing.assert_close(last_w, grads[2])  # the classifier is never clipped (NFNets)
    torch.testing.assert_close(last_b, grads[3])


def test_train_local_with_agc_moves_weights_less():
    ds = load_dataset("digits", "train")
    pre = preprocess_for(ds, normalize=True, augment=False)
    moved = {}
    for clip in (0.0, 1e-3):
        torch.manual_seed(0)
        model = build("resnet8", "nf", in_channels=1, width=0.125)
        start = model.features[1][0].conv.weight.detach().clone()
        train_local(model, ds, np.arange(32), batch_size=8, lr=0.1, momentum=0.0, device="cpu", preprocess=pre,
                    generator=torch.Generator().manual_seed(0), agc_clip=clip)
        w = model.features[1][0].conv.weight.detach()
        moved[clip] = (agc.unitwise_norm(w - start) / agc.unitwise_norm(start)).max().item()
    assert moved[1e-3] <= 4 * 1e-3 * 0.1 * 1.001  # 4 steps of at most lr * clip relative change each
    assert moved[0.0] > moved[1e-3]
    with pytest.raises(FedknError, match="agc clip"):
        train_local(model, ds, np.arange(8), batch_size=8, lr=0.1, device="cpu", preprocess=pre, agc_clip=-0.5)


def test_agc_clip_key_defaults_to_the_norm_and_any_norm_may_set_it():
    assert RunConfig.of(norm="nf").agc_ratio == NF_AGC_CLIP > 0
    assert RunConfig.of(norm="kn").agc_ratio == 0.0 and RunConfig.of(norm="gn").agc_ratio == 0.0
    assert RunConfig.of(norm="gn", agc_clip=0.05).agc_ratio == 0.05
    assert RunConfig.of(norm="nf", agc_clip=0.0).agc_ratio == 0.0
    with pytest.raises(FedknError, match="'agc-clip' must be -1"):
        RunConfig.from_sources(sets=["agc-clip=-0.2"])
