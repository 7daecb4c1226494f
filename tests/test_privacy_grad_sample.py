"""Per-sample gradients under Opacus equal a per-sample loop, for every model that DP-SGD can train."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleHooks

from fedkn.errors import FedknError
from fedkn.models import build
from fedkn.nn.kernelnorm import KNConv2d
from fedkn.nn.wsconv import WSConv2d
from fedkn.privacy import attach, detach, per_sample_gradients, validate_model
from fedkn.privacy.grad_sample import conv_weight_grad_sample, set_method

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

NON_BN = ("kn", "gn", "ln", "wsgn", "none", "nf")
NO_DROPOUT = {"dropout_p": 0.0, "head_dropout_p": 0.0}


def _model(name: str, norm: str, width: float = 0.0625, impl: str = "auto", **norm_options) -> torch.nn.Module:
    """``impl``: KNConv2d's implementation (every per-sample test runs on the fused kernels and the reference)."""
    torch.manual_seed(0)
    opts = {**(norm_options or NO_DROPOUT), "impl": impl} if norm == "kn" else None
    return build(name, norm, num_classes=10, in_channels=1, width=width, norm_options=opts).double().train()


def _loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: one forward/backward per sample."""
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        for n, p in model.named_parameters():
            out.setdefault(n, []).append(p.grad.detach().clone())
    return {n: torch.stack(v) for n, v in out.items()}


def _assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    for name, want in ref.items():
        assert got[name].shape == want.shape, name
        torch.testing.assert_close(got[name], want, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("model_name", ["resnet8", "vgg6"])
@pytest.mark.parametrize(("norm", "impl"), [(n, "auto") for n in NON_BN] + [("kn", "reference")])
def test_per_sample_gradients_match_loop(model_name, norm, impl):
    model = _model(model_name, norm, impl=impl)
    validate_model(model)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    ref = _loop(copy.deepcopy(model), x, y)
    _assert_close(per_sample_gradients(model, x, y), ref)


def test_knresnet18_per_sample_gradients_match_loop():
    model = _model("knresnet18", "kn", width=0.0625)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 3])
    ref = _loop(copy.deepcopy(model), x, y)
    _assert_close(per_sample_gradients(model, x, y), ref)


@pytest.mark.parametrize("method", ["conv", "unfold"])  # "auto" mixes them by layer size (above)
def test_each_weight_gradient_method_matches_loop(method):
    model = _model("vgg6", "kn")
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    y = torch.tensor([2, 2, 9])
    ref = _loop(copy.deepcopy(model), x, y)
    set_method(method)
    try:
        _assert_close(per_sample_gradients(model, x, y), ref)
    finally:
        set_method("auto")


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_train_mode_dropout_uses_the_forward_pass_masks(impl):
    """With KernelNorm's statistics dropout on, per-sample gradients are those of the very forward
    pass that ran (same masks): compared with per-sample autograd over one identical forward."""
    model = _model("resnet8", "kn", impl=impl, dropout_p=0.1, head_dropout_p=0.25)
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    ref_model = copy.deepcopy(model)
    torch.manual_seed(123)
    losses = F.cross_entropy(ref_model(x), y, reduction="none")
    params = list(ref_model.parameters())
    per_sample = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(len(x))]
    ref = {n: torch.stack([g[j] for g in per_sample]) for j, (n, _) in enumerate(ref_model.named_parameters())}
    rng_after_ref = torch.get_rng_state()

    torch.manual_seed(123)
    got = per_sample_gradients(model, x, y)
    _assert_close(got, ref)
    # The replay of the dropout masks leaves the global random stream where the forward left it.
    assert torch.equal(torch.get_rng_state(), rng_after_ref)
    # Sanity: another draw of the masks gives other gradients, so the check above is not vacuous.
    other = per_sample_gradients(model, x, y)
    assert not torch.allclose(other["features.0.0.weight"], ref["features.0.0.weight"])


def test_functorch_fallback_cannot_handle_kn_dropout():
    """Why KNConv2d has a registered rule: Opacus' functorch path re-runs the layer under vmap, where
    the statistics dropout would draw new masks; KNConv2d refuses, naming what to use."""
    model = _model("vgg6", "kn", dropout_p=0.1, head_dropout_p=0.25)
    rule = GradSampleHooks.GRAD_SAMPLERS.pop(KNConv2d)
    try:
        with pytest.raises(FedknError, match="fedkn.privacy.attach"):
            per_sample_gradients(model, torch.rand(2, 1, 16, 16, dtype=torch.float64), torch.tensor([0, 1]))
    finally:
        GradSampleHooks.GRAD_SAMPLERS[KNConv2d] = rule
        detach(model)


PLAIN_OPACUS = """
import copy, sys
import torch, torch.nn.functional as F
from opacus import GradSampleModule, PrivacyEngine
from fedkn.models import build

def model(p):
    torch.manual_seed(0)
    return build("resnet8", "kn", num_classes=10, in_channels=1, width=0.0625,
                 norm_options={"dropout_p": p, "head_dropout_p": 0.0}).double().train()

assert "fedkn.privacy" not in sys.modules
x, y = torch.rand(3, 1, 16, 16, dtype=torch.float64), torch.tensor([1, 4, 7])
m = model(0.0)
ref = copy.deepcopy(m)
gsm = GradSampleModule(m, loss_reduction="sum")
F.cross_entropy(gsm(x), y, reduction="sum").backward()
for name, p in m.named_parameters():
    loop = []
    for i in range(3):
        ref.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        loop.append(dict(ref.named_parameters())[name].grad.clone())
    torch.testing.assert_close(p.grad_sample, torch.stack(loop), rtol=1e-9, atol=1e-11)
m = model(0.0)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
m, opt, loader = PrivacyEngine().make_private(module=m, optimizer=opt, data_loader=loader,
                                              noise_multiplier=1.0, max_grad_norm=1.0)
for xb, yb in loader:
    opt.zero_grad()
    F.cross_entropy(m(xb), yb).backward()
    opt.step()
gsm = GradSampleModule(model(0.1))
try:
    F.cross_entropy(gsm(x), y).backward()
except Exception as err:
    print(type(err).__name__, str(err).splitlines()[0], "|", len(str(err).splitlines()))
"""


def test_plain_opacus_on_a_kn_model_without_importing_fedkn_privacy():
    """A user following Opacus' tutorial: GradSampleModule and make_private on a KN model, nothing
    else imported. Dropout 0: per-sample gradients equal a per-sample loop; dropout > 0: one line that
    says what to use. A fresh process, so no fedkn.privacy rule is registered."""
    done = subprocess.run([sys.executable, "-c", PLAIN_OPACUS], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    head, lines = done.stdout.strip().splitlines()[-1].rsplit(" | ", 1)
    assert head.startswith("FedknError ") and "fedkn.privacy.attach" in head and lines == "1", done.stdout


@pytest.mark.parametrize("kernel,stride,groups,padding", [(3, 1, 1, 1), (2, 2, 2, (1, 0, 1, 0)), (1, 1, 1, 0)])
def test_knconv_layer_rule(kernel, stride, groups, padding):
    torch.manual_seed(1)
    layer = KNConv2d(4, 6, kernel, stride, padding, groups=groups).double()
    head = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.LazyLinear(3)).double()
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    head(x)  # materialize the lazy layer
    y = torch.tensor([0, 1, 2])
    ref = _loop(copy.deepcopy(head), x, y)
    _assert_close(per_sample_gradients(head, x, y), ref)


def test_wsconv_layer_rule_with_bias_and_groups():
    torch.manual_seed(2)
    net = torch.nn.Sequential(WSConv2d(4, 6, 3, 2, 1, bias=True, groups=2), torch.nn.Flatten(),
                              torch.nn.LazyLinear(3)).double()
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    net(x)
    y = torch.tensor([2, 0, 1])
    ref = _loop(copy.deepcopy(net), x, y)
    _assert_close(per_sample_gradients(net, x, y), ref)


@pytest.mark.parametrize("method", ["conv", "unfold"])
def test_conv_weight_grad_sample_matches_autograd(method):
    torch.manual_seed(3)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    out = F.conv2d(x, w, None, (2, 1), 0, 1, 2)
    g = torch.randn_like(out)
    ref = torch.stack([torch.autograd.grad(F.conv2d(x[i : i + 1], w, None, (2, 1), 0, 1, 2), w, g[i : i + 1])[0]
                       for i in range(2)])
    got = conv_weight_grad_sample(x, g, (3, 2), (2, 1), 2, method)
    torch.testing.assert_close(got, ref)
    assert conv_weight_grad_sample(x[:0], g[:0], (3, 2), (2, 1), 2, method).shape == (0, 4, 3, 3, 2)


def test_attach_detach_leaves_the_model_as_it_was():
    model = _model("resnet8", "kn")
    keys = list(model.state_dict())
    attach(model)
    assert list(model.state_dict()) == keys  # hooks, not a wrapper: FedAvg/Flower keys unchanged
    attach(model)  # idempotent (the client app reuses one model across rounds)
    detach(model)
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def test_unknown_method_is_a_fedkn_error():
    with pytest.raises(FedknError, match="conv"):
        set_method("magic")
