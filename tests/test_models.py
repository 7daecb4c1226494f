"""Model registry: every model in every allowed norm builds, runs and behaves per the spec."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedkn.errors import FedknError
from fedkn.models import MODELS, build, count_parameters
from fedkn.nn import NORMS, KNConv2d, get_norm

# Small widths keep the full grid fast on 2 CPU cores.
WIDTH = {"knresnet50": 0.0625, "resnet50": 0.0625, "knresnet34": 0.0625, "resnet34": 0.0625}
GRID = [(m, n) for m, spec in MODELS.items() for n in spec.norms]


@pytest.mark.parametrize("model_name,norm", GRID)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_forward_backward(model_name, norm, channels, size):
    torch.manual_seed(0)
    model = build(model_name, norm, num_classes=7, in_channels=channels, width=WIDTH.get(model_name, 0.125))
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("model_name", ["knresnet18", "resnet18", "knresnet50"])
def test_high_resolution_variants(model_name):
    norm = "kn" if model_name.startswith("kn") else "gn"
    model = build(model_name, norm, num_classes=5, in_channels=3, width=0.0625, high_res=True).eval()
    assert model(torch.rand(1, 3, 128, 128)).shape == (1, 5)


@pytest.mark.parametrize("model_name,norm", GRID)
def test_eval_mode_is_deterministic(model_name, norm):
    torch.manual_seed(0)
    model = build(model_name, norm, in_channels=1, width=WIDTH.get(model_name, 0.125)).eval()
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["kn", "gn", "ln", "wsgn", "none", "nf", "bn"])
def test_batch_independence(norm):
    """Output of sample 0 must not change when the rest of the batch changes (train mode).

    Holds for every batch-independent norm and must fail for BatchNorm, whose batch statistics mix samples.
    """
    model = build("resnet8", norm, in_channels=1, width=0.125, norm_options={"dropout_p": 0.0, "head_dropout_p": 0.0} if norm == "kn" else None)
    model.train()
    torch.manual_seed(0)
    a = torch.rand(4, 1, 16, 16)
    b = a.clone()
    b[1:] = torch.rand(3, 1, 16, 16) * 5
    same = torch.allclose(model(a)[0], model(b)[0], atol=1e-6)
    assert same == get_norm(norm).batch_independent
    assert same == (norm != "bn")


def test_kn_models_use_knconv_and_paper_dropout():
    model = build("resnet8", "kn", width=0.125)
    convs = [m for m in model.modules() if isinstance(m, KNConv2d)]
    assert convs and all(c.dropout_p == 0.1 for c in convs)
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())
    kn18 = build("knresnet18", width=0.125)
    assert {c.dropout_p for c in kn18.modules() if isinstance(c, KNConv2d)} == {0.05}


def test_bn_models_contain_batchnorm_and_gn_keeps_group_count_under_width():
    assert any(isinstance(m, nn.BatchNorm2d) for m in build("resnet18", "bn", width=0.125).modules())
    gns = [m for m in build("resnet8", "gn", width=0.25).modules() if isinstance(m, nn.GroupNorm)]
    # At width 1 the 64/128/256-channel layers have 2/4/8 groups of 32; width 0.25 keeps those counts.
    assert sorted({g.num_groups for g in gns}) == [2, 4, 8]
    lns = [m for m in build("resnet8", "ln", width=0.25).modules() if isinstance(m, nn.GroupNorm)]
    assert {g.num_groups for g in lns} == {1}


def test_parameter_counts_match_between_kn_and_standard_resnets():
    """The KNResNets were designed with about as many parameters as their BatchNorm counterparts."""
    for depth in (18, 34, 50):
        kn = count_parameters(build(f"knresnet{depth}", "kn", width=0.25))
        bn = count_parameters(build(f"resnet{depth}", "bn", width=0.25))
        assert abs(kn - bn) / bn < 0.05


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "resnet9"}, "unknown model 'resnet9'; valid models: resnet8"),
        ({"name": "resnet8", "norm": "xn"}, "unknown norm 'xn'; valid norms: kn, bn"),
        ({"name": "resnet18", "norm": "kn"}, "cannot use norm 'kn'"),
        ({"name": "knresnet18", "norm": "bn"}, "cannot use norm 'bn'"),
        ({"name": "preactresnet18", "norm": "kn"}, "cannot use norm 'kn'"),
        ({"name": "resnet8", "width": 0}, "width must be > 0"),
        ({"name": "resnet8", "norm": "kn", "norm_options": {"groups": 2}}, "unknown option"),
        ({"name": "resnet8", "norm": "kn", "norm_options": {"impl": "fast"}}, "impl must be one of auto, reference"),
        ({"name": "knresnet18", "image_size": 4, "width": 0.0625}, "cannot take 4x4 inputs"),
    ],
)
def test_impossible_combinations_fail_clearly(kwargs, match):
    with pytest.raises(FedknError, match=match):
        build(**kwargs)


@pytest.mark.parametrize("name", ["resnet8", "vgg6", "knresnet18"])
def test_kernelnorm_impl_is_a_norm_option(name):
    """The models pass KNConv2d's impl through (auto by default), so a whole model can run the reference."""
    for impl in ("auto", "reference"):
        options = None if impl == "auto" else {"impl": impl}
        model = build(name, "kn", in_channels=1, width=0.0625, norm_options=options)
        impls = {m.impl for m in model.modules() if isinstance(m, KNConv2d)}
        assert impls == {impl}


def test_every_norm_is_buildable_by_registry_name():
    for name in NORMS:
        assert get_norm(name).name == name
