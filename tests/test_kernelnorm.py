"""KernelNorm layers against a slow reference that literally cuts out and normalizes every unit.

Every KNConv2d test runs on both implementations (``impl``): the plain-autograd reference and the
fused CPU kernels, which must agree with each other and with the unit-by-unit loop here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fedkn.errors import FedknError
from fedkn.nn import KernelNorm2d, KNConv2d, kn_cpu
from fedkn.nn.kernelnorm import draw_dropped

IMPLS = ["reference", "fused"]


def reference_units(x: torch.Tensor, k: tuple[int, int], s: tuple[int, int], pad: tuple[int, int, int, int], eps: float):
    """Python loop over windows: pad, cut each unit (all channels), standardize it, lay units side by side."""
    x = F.pad(x, pad)
    n, c, h, w = x.shape
    kh, kw = k
    h_out, w_out = (h - kh) // s[0] + 1, (w - kw) // s[1] + 1
    out = torch.empty(n, c, kh * h_out, kw * w_out, dtype=x.dtype)
    for b in range(n):
        for i in range(h_out):
            for j in range(w_out):
                unit = x[b, :, i * s[0] : i * s[0] + kh, j * s[1] : j * s[1] + kw]
                mu, var = unit.mean(), unit.var(unbiased=False)
                out[b, :, i * kh : (i + 1) * kh, j * kw : (j + 1) * kw] = (unit - mu) / torch.sqrt(var + eps)
    return out


def reference_knconv(x, layer: KNConv2d) -> torch.Tensor:
    units = reference_units(x, layer.kernel_size, layer.stride, layer.padding, layer.eps)
    return F.conv2d(units, layer.weight, layer.bias, stride=layer.kernel_size, groups=layer.groups)


CASES = [
    # in, out, kernel, stride, padding, groups
    (3, 5, 3, 1, 1, 1),
    (4, 6, 2, 1, (1, 0, 1, 0), 1),
    (4, 6, 2, 1, (0, 1, 0, 1), 2),
    (3, 4, 3, 2, 1, 1),
    (4, 4, 1, 1, 0, 1),
    (6, 9, 3, 2, (2, 1, 0, 1), 3),
    (2, 3, (3, 2), (2, 1), (1, 1, 0, 2), 1),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_knconv_matches_unfold_reference(case, impl):
    torch.manual_seed(0)
    cin, cout, k, s, p, g = case
    layer = KNConv2d(cin, cout, k, s, p, groups=g, dropout_p=0.1, impl=impl).double().eval()
    layer.bias.data.normal_()
    x = torch.randn(2, cin, 7, 6, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(layer(x), reference_knconv(x, layer), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_knconv_float32_close_to_reference(case, impl):
    torch.manual_seed(1)
    cin, cout, k, s, p, g = case
    layer = KNConv2d(cin, cout, k, s, p, groups=g, impl=impl).eval()
    x = torch.rand(3, cin, 8, 8)  # raw [0,1] pixels, as KN models get them
    torch.testing.assert_close(layer(x), reference_knconv(x.double(), layer.double()).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_knconv_dropout_zero_train_equals_eval(impl):
    layer = KNConv2d(3, 4, 3, 1, 1, dropout_p=0.0, impl=impl)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer.train()(x), layer.eval()(x))


@pytest.mark.parametrize("impl", IMPLS)
def test_knconv_training_dropout_perturbs_output_reproducibly(impl):
    """Training-mode dropout on the statistics changes the output; under a fixed seed it repeats."""
    torch.manual_seed(0)
    layer = KNConv2d(3, 4, 2, 1, 0, dropout_p=0.5, impl=impl).train()
    x = torch.randn(2, 3, 5, 5)
    assert not torch.allclose(layer(x), layer.eval()(x))
    layer.train()
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    torch.testing.assert_close(layer(x), a)  # seeded dropout is reproducible


@pytest.mark.parametrize(
    "k,s,p",
    [(3, 1, 1), (2, 2, 0), (2, 1, (1, 0, 1, 0)), (1, 1, 0), (3, 2, (0, 1, 2, 0))],
)
def test_kernelnorm2d_layout_matches_reference(k, s, p):
    torch.manual_seed(0)
    layer = KernelNorm2d(k, s, p).eval()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    pad = layer.padding
    torch.testing.assert_close(layer(x), reference_units(x, layer.kernel_size, layer.stride, pad, layer.eps))


@pytest.mark.parametrize("impl", IMPLS)
def test_kernelnorm2d_then_conv_equals_knconv(impl):
    """The spec's definition: KNConv2d == KernelNorm2d(k, s, p) followed by Conv2d(k, stride k)."""
    torch.manual_seed(0)
    layer = KNConv2d(4, 5, 3, 2, (1, 0, 1, 1), groups=1, impl=impl).double().eval()
    norm = KernelNorm2d(3, 2, (1, 0, 1, 1)).eval()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    expected = F.conv2d(norm(x), layer.weight, layer.bias, stride=3)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [(2, 3, 2, 1, (1, 0, 1, 0), 1), (4, 4, 3, 2, 1, 2), (3, 2, 1, 1, 0, 1)])
def test_knconv_gradcheck(case, impl):
    torch.manual_seed(0)
    cin, cout, k, s, p, g = case
    layer = KNConv2d(cin, cout, k, s, p, groups=g, impl=impl).double().eval()
    x = torch.randn(2, cin, 5, 5, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True)

    def fn(inp, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (inp,))

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_kernelnorm2d_gradcheck():
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(KernelNorm2d(2, 1, (1, 0, 1, 0)).eval(), (x,))


def test_knconv_is_not_a_conv2d_and_has_conv_shaped_params():
    layer = KNConv2d(4, 8, 3, 1, 1, groups=2)
    assert not isinstance(layer, torch.nn.Conv2d)
    assert layer.weight.shape == (8, 2, 3, 3) and layer.bias.shape == (8,)
    assert "dropout_p" in repr(layer)


def test_knconv_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible by groups"):
        KNConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="dropout_p"):
        KNConv2d(3, 4, 3, dropout_p=1.0)
    with pytest.raises(ValueError, match="padding"):
        KNConv2d(3, 4, 3, padding=(1, 2, 3))
    with pytest.raises(ValueError, match="impl"):
        KNConv2d(3, 4, 3, impl="fast")


def test_knconv_scripts_and_compiles_shape():
    """No Python loop over windows: torch.jit.trace gives the same result as eager."""
    layer = KNConv2d(3, 4, 3, 1, 1).eval()
    x = torch.rand(2, 3, 8, 8)
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", [(1, 0, 1, 0), 1])
def test_knconv_training_dropout_gradcheck_and_reference(padding, impl):
    """Training mode: statistics from the dropped-out input, convolution on the original input.

    The mask is drawn over the input (never over the padding: a dropped zero changes nothing).
    """
    torch.manual_seed(0)
    layer = KNConv2d(3, 4, 2, 1, padding, dropout_p=0.3, impl=impl).double().train()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def seeded(inp):
        torch.manual_seed(123)
        return layer(inp)

    assert torch.autograd.gradcheck(seeded, (x,))
    # Reference with the same mask: unit stats of the masked/rescaled input, normalizing the original.
    torch.manual_seed(123)
    index = draw_dropped(x.numel(), 0.3)
    keep = torch.ones(x.numel(), dtype=torch.bool)
    keep[index[index < x.numel()]] = False
    x_pad = F.pad(x, layer.padding)
    dropped = F.unfold(F.pad(x * keep.view_as(x) / 0.7, layer.padding), 2)
    units = F.unfold(x_pad, 2)
    var, mu = torch.var_mean(dropped, dim=1, keepdim=True, correction=0)
    normed = (units - mu) / torch.sqrt(var + layer.eps)
    h = x_pad.shape[-1] - 1
    expected = (layer.weight.view(4, -1) @ normed).view(2, 4, h, h) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(seeded(x), expected)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_draw_dropped_is_a_bernoulli_mask(p):
    """The sparse draw is a Bernoulli(p) mask: unique in-range indices, the right rate everywhere."""
    numel = 200_000
    torch.manual_seed(0)
    index = draw_dropped(numel, p)
    assert bool((index[1:] > index[:-1]).all())  # increasing, so unique
    assert int(index[0]) >= 0 and int(index[-1]) >= numel  # the tail (past the end) is padding
    drops = index[index < numel]
    sigma = (numel * p * (1 - p)) ** 0.5
    assert abs(len(drops) - numel * p) < 5 * sigma
    # Uniform over positions: each tenth of the range gets its share, and so do even/odd positions.
    tenth = torch.bincount(drops // (numel // 10), minlength=10).double()
    assert ((tenth - numel * p / 10).abs() < 5 * sigma / 10**0.5).all()
    assert abs(int((drops % 2 == 0).sum()) - len(drops) / 2) < 5 * len(drops) ** 0.5 / 2
    # Gaps are geometric: P(gap == 1) = p.
    gaps = drops.diff()
    assert abs(float((gaps == 1).double().mean()) - p) < 5 * (p * (1 - p) / len(gaps)) ** 0.5


@pytest.mark.parametrize("impl", IMPLS)
def test_knconv_input_gradient_only_or_weight_only(impl):
    """Backward computes just what is asked for (frozen weights, or a leaf input without grad)."""
    torch.manual_seed(3)
    layer = KNConv2d(3, 4, 2, 1, (1, 0, 1, 0), dropout_p=0.2, impl=impl).double().train()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    layer(x).square().sum().backward()
    full_x, full_w = x.grad.clone(), layer.weight.grad.clone()
    x.grad, layer.weight.grad = None, None
    layer.requires_grad_(False)
    torch.manual_seed(5)
    layer(x).square().sum().backward()
    torch.testing.assert_close(x.grad, full_x)
    layer.requires_grad_(True)
    torch.manual_seed(5)
    layer(x.detach()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, full_w)


def test_knconv_fused_saves_its_output_so_in_place_edits_are_refused():
    """The fused backward reads the layer's output; editing it in place must fail loudly, never corrupt gradients."""
    layer = KNConv2d(3, 4, 3, 1, 1, dropout_p=0.1, impl="fused").train()
    x = torch.rand(2, 3, 6, 6, requires_grad=True)
    out = layer(x)
    out.relu_()
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()
    layer(x).relu().sum().backward()  # the out-of-place form is fine
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_knconv_empty_batch_in_training_mode(impl):
    layer = KNConv2d(3, 4, 2, 1, (1, 0, 1, 0), dropout_p=0.1, impl=impl).train()
    x = torch.rand(0, 3, 6, 6, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 4, 6, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("case", "bias", "frozen"),
    [(case, True, None) for case in CASES]
    + [((4, 6, 2, 1, (1, 0, 1, 0), 1), False, None), ((4, 6, 2, 1, 1, 2), True, "weights"),
       ((4, 6, 3, 2, (0, 1, 0, 1), 1), True, "input")],
)
def test_fused_equals_reference_with_the_same_dropout_draws(case, bias, frozen, dtype):
    """The fused kernels compute the reference's outputs and every gradient, dropout on (same draws).

    All geometries, with and without bias, with only the input's or only the weights' gradient
    asked for; float64 to 1e-9, float32 to float tolerance. A dense upstream gradient, so every
    output position matters.
    """
    cin, cout, k, s, p, g = case
    torch.manual_seed(4)
    ref = KNConv2d(cin, cout, k, s, p, bias=bias, groups=g, dropout_p=0.2, impl="reference").to(dtype).train()
    if bias:
        ref.bias.data.normal_()
    fused = KNConv2d(cin, cout, k, s, p, bias=bias, groups=g, dropout_p=0.2, impl="fused").to(dtype).train()
    fused.load_state_dict(ref.state_dict())
    x = (torch.randn(5, cin, 7, 6) * 2 + 0.5).to(dtype).requires_grad_(frozen != "input")
    results = []
    for layer in (ref, fused):
        layer.requires_grad_(frozen != "weights")
        torch.manual_seed(9)
        out = layer(x)
        weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
        inputs = ([x] if x.requires_grad else []) + [q for q in layer.parameters() if q.requires_grad]
        results.append([out.detach(), *torch.autograd.grad((out * weights).sum(), inputs)])
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert len(results[0]) == len(results[1]) > 1
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_fused_and_reference_draw_the_same_masks_and_leave_the_same_random_state():
    """Both implementations draw their dropout first and alike, so a seeded run is the same run."""
    layers = [KNConv2d(3, 4, 3, 1, 1, dropout_p=0.3, impl=impl).double().train() for impl in IMPLS]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    outs, states = [], []
    for layer in layers:
        torch.manual_seed(2)
        outs.append(layer(x))
        states.append(torch.get_rng_state())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    assert torch.equal(states[0], states[1])


def test_auto_uses_the_fused_kernels_on_cpu_and_the_reference_under_transforms(monkeypatch):
    calls = []
    monkeypatch.setattr(kn_cpu, "kn_conv2d", lambda *a: calls.append(1) or torch.zeros(()))
    layer = KNConv2d(2, 3, 3, 1, 1).double().eval()
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    layer(x)
    assert calls == [1]
    torch.func.vmap(layer)(x.unsqueeze(1))  # torch.func: the reference (the fused path has no batching rule)
    torch.jit.trace(layer, x, check_trace=False)
    assert calls == [1]
    with pytest.raises(FedknError, match="impl='fused'.*CPU"):
        KNConv2d(2, 3, 3, impl="fused").to("meta")(x.to("meta"))
    with pytest.raises(FedknError, match="float32 or float64"):
        KNConv2d(2, 3, 3, impl="fused").half()(x.half())


def test_statistics_dropout_under_torch_func_says_what_to_use():
    """Opacus' functorch path re-runs a layer under vmap; with dropout that would redraw the masks."""
    layer = KNConv2d(2, 3, 3, 1, 1, dropout_p=0.1).train()
    with pytest.raises(FedknError, match="fedkn.privacy.attach"):
        torch.func.vmap(layer)(torch.rand(2, 1, 2, 5, 5))


def test_without_a_compiler_kernelnorm_falls_back_to_the_reference_with_one_notice(tmp_path):
    """No C++ compiler: one line on stderr, and the layer still computes KernelNorm (the reference)."""
    code = (
        "import torch\nfrom fedkn.nn import KNConv2d\n"
        "torch.manual_seed(0)\nlayer = KNConv2d(3, 4, 3, 1, 1).eval()\nx = torch.rand(2, 3, 6, 6)\n"
        "out = [layer(x) for _ in range(2)]\nlayer.impl = 'reference'\n"
        "print(all(torch.equal(o, layer(x)) for o in out))"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "FEDKN_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    notices = [line for line in done.stderr.splitlines() if "fused CPU kernels are unavailable" in line]
    assert len(notices) == 1 and "reference path" in notices[0]


def test_knconv_compiles_without_graph_breaks_and_matches_eager():
    """torch.compile traces the layer whole (its reference form, dropout draws included) and computes
    what eager computes (the fused kernels, on this CPU)."""
    torch.manual_seed(0)
    layer = KNConv2d(3, 4, 2, 1, (1, 0, 1, 0), dropout_p=0.1).double().train()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    results = []
    for module in (torch.compile(layer, backend="aot_eager"), layer):
        x.grad, layer.weight.grad = None, None
        torch.manual_seed(1)
        out = module(x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad.clone(), layer.weight.grad.clone()))
    torch._dynamo.reset()
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", [1, (1, 0, 1, 0)])
def test_knconv_channels_last_matches_contiguous(padding, impl):
    """Memory layout is not semantics: channels_last inputs and gradients give the same results."""
    torch.manual_seed(0)
    layer = KNConv2d(4, 6, 2, 1, padding, dropout_p=0.2, impl=impl).double().train()
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        layer.weight.grad = None
        inp = x.clone(memory_format=fmt).requires_grad_()
        torch.manual_seed(5)
        out = layer(inp)
        grad = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape).to(memory_format=fmt)
        out.backward(grad)
        results.append((out.detach(), inp.grad, layer.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
