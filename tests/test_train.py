"""Local training and evaluation (plain PyTorch, no Flower)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkn.data import load_dataset, preprocess_for
from fedkn.errors import DivergedError, FedknError
from fedkn.models import build
from fedkn.train import (
    EvalResult,
    TrainResult,
    check_batch_size,
    default_device,
    evaluate,
    make_optimizer,
    proximal_term,
    train_local,
)

WIDTH = 0.125


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


def _model(norm: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("resnet8", norm, num_classes=10, in_channels=1, width=WIDTH)


def _pre(ds, norm):
    return preprocess_for(ds, normalize=norm != "kn", augment=False)


def _train(model, ds, idx, norm, **kw):
    args = {"batch_size": 8, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "generator": torch.Generator().manual_seed(0),
                "device": "cpu", "preprocess": _pre(ds, norm)}
    args.update(kw)
    return train_local(model, ds, idx, **args)


def test_training_lowers_loss_and_reports_counts(digits):
    idx = np.arange(96)
    model = _model("kn")
    before = evaluate(model, digits, idx, 64, "cpu", _pre(digits, "kn"))
    res = _train(model, digits, idx, "kn", epochs=3)
    after = evaluate(model, digits, idx, 64, "cpu", _pre(digits, "kn"))
    assert isinstance(res, TrainResult) and isinstance(after, EvalResult)
    assert res.num_examples == 96 and res.steps == 3 * 12
    assert math.isfinite(res.loss) and 0.0 <= res.accuracy <= 1.0
    assert after.loss < before.loss
    assert after.num_examples == 96


def test_fixed_number_of_steps_cycles_epochs(digits):
    res = _train(_model("gn"), digits, np.arange(20), "gn", steps=7)
    assert res.steps == 7  # 20 samples, batch 8: 3 batches per pass, so more than two passes


@pytest.mark.parametrize("norm", ["kn", "gn", "ln", "none", "nf"])
def test_batch_size_one_works_for_batch_independent_norms(digits, norm):
    res = _train(_model(norm), digits, np.arange(5), norm, batch_size=1)
    assert res.steps == 5 and math.isfinite(res.loss)


def test_batch_size_one_is_rejected_up_front_for_batchnorm(digits):
    model = _model("bn")
    with pytest.raises(FedknError) as info:
        _train(model, digits, np.arange(5), "bn", batch_size=1)
    msg = str(info.value)
    assert "BatchNorm" in msg and "kn" in msg and "gn" in msg and "\n" not in msg
    check_batch_size(model, 2)  # fine
    check_batch_size(_model("kn"), 1)  # fine


def test_batchnorm_skips_a_trailing_batch_of_one(digits):
    res = _train(_model("bn"), digits, np.arange(9), "bn", batch_size=8)
    assert res.steps == 1  # the 9th sample alone would crash BatchNorm's statistics


def test_same_generator_gives_same_weights(digits):
    runs = []
    for _ in range(2):
        model = _model("kn")
        torch.manual_seed(123)  # KernelNorm's statistics dropout uses the global generator
        _train(model, digits, np.arange(40), "kn", generator=torch.Generator().manual_seed(5))
        runs.append(model.state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_proximal_term_keeps_weights_near_the_global_model(digits):
    start = _model("gn").state_dict()
    drift = {}
    for mu in (0.0, 10.0):
        model = _model("gn")
        _train(model, digits, np.arange(64), "gn", epochs=2, proximal_mu=mu)
        drift[mu] = sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in model.named_parameters())
    assert drift[10.0] < drift[0.0]
    model = _model("gn")
    glob = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert float(proximal_term(model, glob).detach()) == 0.0


def test_optimizer_is_sgd_with_momentum_and_weight_decay():
    opt = make_optimizer(_model("kn"), lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 1e-4)


def test_wrappable_optimizer_and_batches(digits):
    calls = {"opt": 0, "batches": 0}

    def my_opt(model, **kw):
        calls["opt"] += 1
        return make_optimizer(model, **kw)

    def my_batches(ds, idx, *, batch_size, generator, preprocess):
        calls["batches"] += 1
        x = preprocess(ds.images[idx[:4]], generator)
        yield x, ds.labels[idx[:4]]

    res = _train(_model("kn"), digits, np.arange(16), "kn", epochs=2, make_optimizer_fn=my_opt, make_batches_fn=my_batches)
    assert calls == {"opt": 1, "batches": 2} and res.steps == 2


def test_empty_client_and_eval_restore_mode(digits):
    model = _model("kn")
    assert _train(model, digits, np.array([], dtype=np.int64), "kn").num_examples == 0
    model.train()
    res = evaluate(model, digits, np.arange(10), 4, "cpu", _pre(digits, "kn"))
    assert model.training and res.num_examples == 10 and 0.0 <= res.accuracy <= 1.0
    assert evaluate(model, digits, np.array([], dtype=np.int64), 4, "cpu", _pre(digits, "kn")).num_examples == 0


def test_divergence_is_a_clear_error(digits):
    with pytest.raises(DivergedError, match="training diverged .* lower lr"):
        _train(_model("none"), digits, np.arange(64), "none", lr=1e6, epochs=3)


def test_default_device_is_chosen_once():
    assert default_device() is default_device()
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_device_label_names_what_decides_the_rounding():
    from fedkn.train import device_label

    label = device_label(torch.device("cpu"))
    assert label == f"cpu ({torch.backends.cpu.get_cpu_capability()})" and label != "cpu ()"
