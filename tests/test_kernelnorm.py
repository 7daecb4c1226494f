"""KernelNorm layers against a slow reference that literally cuts out and normalizes every unit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedkn.nn import KernelNorm2d, KNConv2d
from fedkn.nn.kernelnorm import draw_dropped


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


@pytest.mark.parametrize("case", CASES)
def test_knconv_matches_unfold_reference(case):
    torch.manual_seed(0)
    cin, cout, k, s, p, g = case
    layer = KNConv2d(cin, cout, k, s, p, groups=g, dropout_p=0.1).double().eval()
    layer.bias.data.normal_()
    x = torch.randn(2, cin, 7, 6, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(layer(x), reference_knconv(x, layer), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_knconv_float32_close_to_reference(case):
    torch.manual_seed(1)
    cin, cout, k, s, p, g = case
    layer = KNConv2d(cin, cout, k, s, p, groups=g).eval()
    x = torch.rand(3, cin, 8, 8)  # raw [0,1] pixels, as KN models get them
    torch.testing.assert_close(layer(x), reference_knconv(x.double(), layer.double()).float(), rtol=1e-4, atol=1e-4)


def test_knconv_dropout_zero_train_equals_eval():
    layer = KNConv2d(3, 4, 3, 1, 1, dropout_p=0.0)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer.train()(x), layer.eval()(x))


def test_knconv_training_dropout_perturbs_output_reproducibly():
    """Training-mode dropout on the statistics changes the output; under a fixed seed it repeats."""
    torch.manual_seed(0)
    layer = KNConv2d(3, 4, 2, 1, 0, dropout_p=0.5).train()
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


def test_kernelnorm2d_then_conv_equals_knconv():
    """The spec's definition: KNConv2d == KernelNorm2d(k, s, p) followed by Conv2d(k, stride k)."""
    torch.manual_seed(0)
    layer = KNConv2d(4, 5, 3, 2, (1, 0, 1, 1), groups=1).double().eval()
    norm = KernelNorm2d(3, 2, (1, 0, 1, 1)).eval()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    expected = F.conv2d(norm(x), layer.weight, layer.bias, stride=3)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("case", [(2, 3, 2, 1, (1, 0, 1, 0), 1), (4, 4, 3, 2, 1, 2), (3, 2, 1, 1, 0, 1)])
def test_knconv_gradcheck(case):
    torch.manual_seed(0)
    cin, cout, k, s, p, g = case
    layer = KNConv2d(cin, cout, k, s, p, groups=g).double().eval()
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


def test_knconv_scripts_and_compiles_shape():
    """No Python loop over windows: torch.jit.trace gives the same result as eager."""
    layer = KNConv2d(3, 4, 3, 1, 1).eval()
    x = torch.rand(2, 3, 8, 8)
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x))


@pytest.mark.parametrize("padding", [(1, 0, 1, 0), 1])
def test_knconv_training_dropout_gradcheck_and_reference(padding):
    """Training mode: statistics from the dropped-out input, convolution on the original input.

    The mask is drawn over the padded input when the padding is asymmetric and over the input
    itself when the convolution pads (symmetric padding); the padded zeros are zeros either way.
    """
    torch.manual_seed(0)
    layer = KNConv2d(3, 4, 2, 1, padding, dropout_p=0.3).double().train()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def seeded(inp):
        torch.manual_seed(123)
        return layer(inp)

    assert torch.autograd.gradcheck(seeded, (x,))
    # Reference with the same mask: unit stats of the masked/rescaled input, normalizing the original.
    torch.manual_seed(123)
    x_pad = F.pad(x, layer.padding)
    src = x if padding == 1 else x_pad
    index = draw_dropped(src.numel(), 0.3)
    keep = torch.ones(src.numel(), dtype=torch.bool)
    keep[index[index < src.numel()]] = False
    dropped_src = src * keep.view_as(src) / 0.7
    dropped_pad = F.pad(dropped_src, layer.padding) if padding == 1 else dropped_src
    dropped = F.unfold(dropped_pad, 2)
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


def test_knconv_input_gradient_only_or_weight_only():
    """Backward computes just what is asked for (frozen weights, or a leaf input without grad)."""
    torch.manual_seed(3)
    layer = KNConv2d(3, 4, 2, 1, (1, 0, 1, 0), dropout_p=0.2).double().train()
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


def test_knconv_saves_its_output_so_in_place_edits_are_refused():
    """Backward reads the layer's output; editing it in place must fail loudly, never corrupt gradients."""
    layer = KNConv2d(3, 4, 3, 1, 1, dropout_p=0.1).train()
    x = torch.rand(2, 3, 6, 6, requires_grad=True)
    out = layer(x)
    out.relu_()
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()
    layer(x).relu().sum().backward()  # the out-of-place form is fine
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_knconv_empty_batch_in_training_mode():
    layer = KNConv2d(3, 4, 2, 1, (1, 0, 1, 0), dropout_p=0.1).train()
    x = torch.rand(0, 3, 6, 6, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 4, 6, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize(
    ("padding", "bias", "groups", "frozen"),
    [((1, 0, 1, 0), True, 1, None), (1, False, 2, None), (0, True, 1, "weights"), ((0, 1, 0, 1), True, 1, "input")],
)
def test_knconv_batch_chunks_equal_whole_batch(monkeypatch, padding, bias, groups, frozen):
    """On CPU large layers run a few samples at a time (forward, backward, channel sums); nothing may change.

    A batch of 7 in 2-3 chunks with a short last one, dropout on, with and without the padded copy,
    bias and groups, and with only the input's or only the weights' gradient asked for.
    """
    from fedkn.nn import kernelnorm

    torch.manual_seed(4)
    layer = KNConv2d(4, 6, 2, 1, padding, bias=bias, groups=groups, dropout_p=0.2).double().train()
    x = torch.randn(7, 4, 6, 6, dtype=torch.float64, requires_grad=frozen != "input")
    layer.requires_grad_(frozen != "weights")
    params = [p for p in layer.parameters() if p.requires_grad]

    def run() -> list[torch.Tensor]:
        torch.manual_seed(9)
        out = layer(x)
        weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        inputs = ([x] if x.requires_grad else []) + params
        return [out.detach(), *torch.autograd.grad((out * weights).sum(), inputs)]

    whole = run()
    calls: list[list[slice] | None] = []
    chunks = kernelnorm._batch_chunks

    def recorded(*args):
        calls.append(chunks(*args))
        return calls[-1]

    monkeypatch.setattr(kernelnorm, "_batch_chunks", recorded)
    monkeypatch.setattr(kernelnorm, "_CPU_SPLIT_BYTES", 0)
    monkeypatch.setattr(kernelnorm, "_CPU_CHUNK_BYTES", 3 * (4 * 7 * 7 + 6 * 7 * 7) * 8)  # 3 samples per chunk
    assert [(c.start, c.stop) for c in chunks(7, (4 * 7 * 7 + 6 * 7 * 7) * 8, x)] == [(0, 3), (3, 6), (6, 9)]
    chunked = run()
    assert len(calls) == 3  # channel sums, forward, backward all went through the chunking
    assert calls[1] == calls[2] and len(calls[1]) > 1  # forward and backward split the batch alike
    assert len(whole) == len(chunked) == 1 + (frozen != "input") + len(params)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.equal(whole[0], torch.zeros_like(whole[0]))


def test_knconv_compiles_without_graph_breaks_and_matches_eager():
    """torch.compile traces the fused layer whole (dropout draws included) and computes the same thing."""
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


@pytest.mark.parametrize("padding", [1, (1, 0, 1, 0)])
def test_knconv_channels_last_matches_contiguous(padding):
    """Memory layout is not semantics: channels_last inputs and gradients give the same results."""
    torch.manual_seed(0)
    layer = KNConv2d(4, 6, 2, 1, padding, dropout_p=0.2).double().train()
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
