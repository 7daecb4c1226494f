"""DP-SGD on a client: validation, Poisson batches, private local training, a 2-round DP run."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

import fedkn.train as train_mod
from fedkn.data import ImageDataset, Preprocess
from fedkn.errors import FedknError
from fedkn.models import build
from fedkn.privacy import (
    DPSettings,
    PrivacyLedger,
    check_norm,
    detach,
    make_private,
    poisson_batches,
    poisson_plan,
    validate_model,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _dataset(n: int, size: int = 16, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageDataset("random", images, labels, tuple(str(i) for i in range(10)), (0.5,), (0.25,))


def _pre(normalize: bool = False) -> Preprocess:
    return Preprocess((0.5,), (0.25,), normalize=normalize)


def _train_private(model, ds, idx, session, *, lr=0.05, momentum=0.0, proximal_mu=0.0, generator=None, **kw):
    """train_local with the session's pieces (train_step_fn once train.py has it; patched until then)."""
    kwargs = dict(batch_size=8, lr=lr, momentum=momentum, weight_decay=0.0, steps=session.steps_per_round,
                  proximal_mu=proximal_mu, generator=generator, device="cpu", preprocess=_pre(),
                  make_optimizer_fn=session.make_optimizer, make_batches_fn=session.make_batches, **kw)
    params = inspect.signature(train_mod.train_local).parameters
    with contextlib.ExitStack() as stack:
        if "train_step_fn" in params:
            kwargs["train_step_fn"] = session.train_step
        else:
            mp = stack.enter_context(pytest.MonkeyPatch.context())
            mp.setattr(train_mod, "train_step", session.train_step)
        try:
            return train_mod.train_local(model, ds, idx, **kwargs)
        finally:
            session.close()


# -- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["resnet8", "vgg6"])
def test_batchnorm_is_rejected_naming_alternatives(model_name):
    model = build(model_name, "bn", num_classes=10, in_channels=1, width=0.0625)
    with pytest.raises(FedknError, match="BatchNorm") as err:
        validate_model(model)
    assert "kn" in str(err.value) and "gn" in str(err.value) and "ln" in str(err.value)
    with pytest.raises(FedknError, match="kn, gn"):
        make_private(model, num_samples=10, batch_size=2, settings=DPSettings(noise_multiplier=1.0))
    with pytest.raises(FedknError, match="batch-independent"):
        check_norm("bn")
    for norm in ("kn", "gn", "ln", "wsgn", "none"):
        check_norm(norm)


def test_other_unsupported_layers_are_rejected():
    with pytest.raises(FedknError, match="buffers"):
        validate_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, affine=True, track_running_stats=True)))
    with pytest.raises(FedknError, match="Opacus"):
        validate_model(nn.LSTM(4, 4))

    class MyConv(nn.Conv2d):
        pass

    with pytest.raises(FedknError, match="subclass of Conv2d"):
        validate_model(nn.Sequential(MyConv(1, 2, 3)))
    # A supported model passes, including the dry run that checks every parameter's grad_sample.
    model = build("resnet8", "kn", num_classes=10, in_channels=1, width=0.0625)
    validate_model(model, example_input=torch.rand(2, 1, 16, 16))
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_settings_need_exactly_one_noise_source():
    with pytest.raises(FedknError, match="exactly one"):
        DPSettings()
    with pytest.raises(FedknError, match="exactly one"):
        DPSettings(noise_multiplier=1.0, target_epsilon=3.0)
    with pytest.raises(FedknError, match="max grad norm"):
        DPSettings(noise_multiplier=1.0, max_grad_norm=0.0)


# -- Poisson batches -----------------------------------------------------------------------------------


def test_poisson_plan_follows_opacus():
    assert poisson_plan(40, 8) == (1 / 5, 5)
    assert poisson_plan(41, 8, local_epochs=2) == (1 / 6, 12)
    assert poisson_plan(3, 8) == (1.0, 1)  # smaller than a batch: whole dataset each step
    assert poisson_plan(3, 8, local_steps=7) == (1.0, 7)
    with pytest.raises(FedknError, match="without training examples"):
        poisson_plan(0, 8)


def test_poisson_batches_on_a_three_sample_client():
    ds = _dataset(10)
    idx = np.array([2, 5, 7])
    batches = list(poisson_batches(ds, idx, sample_rate=1 / 3, steps=60,
                                   generator=torch.Generator().manual_seed(0), preprocess=_pre()))
    assert len(batches) == 60
    sizes = [len(y) for _, y in batches]
    assert 0 in sizes and max(sizes) >= 2 and set(sizes) <= {0, 1, 2, 3}
    allowed = {int(ds.labels[i]) for i in idx}
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (len(y), 1, 16, 16) and y.dtype == torch.int64
        assert {int(v) for v in y} <= allowed
    # Roughly q * n per batch on average.
    assert abs(np.mean(sizes) - 1.0) < 0.35


def test_dp_training_with_empty_batches_takes_noise_steps():
    torch.manual_seed(0)
    ds = _dataset(10)
    idx = np.array([0, 1, 2])
    model = build("resnet8", "kn", num_classes=10, in_channels=1, width=0.0625)
    before = copy.deepcopy(model.state_dict())
    session = make_private(model, num_samples=3, batch_size=1, settings=DPSettings(noise_multiplier=1.0),
                           local_steps=12)
    assert session.sample_rate == pytest.approx(1 / 3)
    res = _train_private(model, ds, idx, session, generator=torch.Generator().manual_seed(1))
    assert res.steps == 12 and session.steps_taken == 12
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- private local training ----------------------------------------------------------------------------


def test_dp_sgd_local_training_of_resnet8_kn_reports_epsilon():
    torch.manual_seed(0)
    ds = _dataset(48)
    idx = np.arange(40)
    model = build("resnet8", "kn", num_classes=10, in_channels=1, width=0.0625)
    keys = list(model.state_dict())
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3)
    session = make_private(model, num_samples=len(idx), batch_size=8, settings=settings)
    res = _train_private(model, ds, idx, session, generator=torch.Generator().manual_seed(0))
    assert res.steps == session.steps_per_round == 5 and res.num_examples == 40
    assert math.isfinite(res.loss)
    ledger = session.new_ledger()
    session.record(ledger, server_round=1)
    metrics = session.metrics(ledger)
    assert 0 < metrics["dp-epsilon-round"] == metrics["dp-epsilon"] < math.inf
    assert metrics["dp-steps"] == 5 and metrics["dp-sample-rate"] == pytest.approx(0.2)
    # The model is left as it was found: same keys, no hooks, no per-sample state.
    assert list(model.state_dict()) == keys
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())


@pytest.mark.parametrize("proximal_mu", [0.0, 0.5])
def test_noiseless_unclipped_full_batch_dp_step_equals_plain_sgd(proximal_mu):
    """sigma=0, a clipping bound nobody reaches and q=1: DP-SGD must reduce to SGD (FedProx included)."""
    torch.manual_seed(0)
    ds = _dataset(6)
    idx = np.arange(6)
    base = build("vgg6", "kn", num_classes=10, in_channels=1, width=0.0625,
                 norm_options={"dropout_p": 0.0, "head_dropout_p": 0.0}).double()
    x = _pre()(ds.images[idx]).double()
    y = ds.labels[idx]
    plain = copy.deepcopy(base)
    global_params = {n: p.detach().clone() for n, p in base.named_parameters()}
    with torch.no_grad():  # start away from the global model so the proximal term matters
        for p in plain.parameters():
            p.add_(0.01)
    private = copy.deepcopy(plain)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    train_mod.train_step(plain, opt, x, y, proximal_mu=proximal_mu, global_params=global_params)

    session = make_private(private, num_samples=6, batch_size=6,
                           settings=DPSettings(noise_multiplier=0.0, max_grad_norm=1e6))
    dp_opt = session.make_optimizer(private, lr=0.1, momentum=0.0, weight_decay=0.0)
    session.train_step(private, dp_opt, x, y, proximal_mu=proximal_mu, global_params=global_params)
    session.close()
    for (n, a), b in zip(plain.named_parameters(), private.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


@pytest.mark.parametrize("norm", ["kn", "gn"])
def test_two_round_dp_federation_meets_target_epsilon(norm):
    """Two clients, two FedAvg rounds, noise calibrated to epsilon 4 over the planned 2 rounds."""
    torch.manual_seed(0)
    ds = _dataset(40)
    clients = [np.arange(0, 24), np.arange(24, 40)]
    settings = DPSettings(target_epsilon=4.0, delta=1e-3, max_grad_norm=1.0)
    global_model = build("resnet8", norm, num_classes=10, in_channels=1, width=0.0625)
    ledgers = [PrivacyLedger(settings.delta, settings.accountant) for _ in clients]
    for rnd in (1, 2):
        states, weights = [], []
        for k, idx in enumerate(clients):
            model = copy.deepcopy(global_model)
            session = make_private(model, num_samples=len(idx), batch_size=8, settings=settings, rounds=2)
            res = _train_private(model, ds, idx, session, generator=torch.Generator().manual_seed(10 * rnd + k))
            assert res.steps == session.steps_per_round
            session.record(ledgers[k], rnd)
            states.append(model.state_dict())
            weights.append(len(idx))
        avg = {key: sum(w * s[key] for w, s in zip(weights, states)) / sum(weights) for key in states[0]}
        global_model.load_state_dict(avg)
    for ledger in ledgers:
        assert ledger.rounds_participated == 2
        assert ledger.epsilon(up_to_round=1) < ledger.epsilon() <= 4.0
        assert ledger.epsilon() > 3.9
    assert all(torch.isfinite(v).all() for v in global_model.state_dict().values())
    detach(global_model)


def test_settings_from_config_keys():
    from fedkn.config import RunConfig
    from fedkn.privacy.dpsgd import settings_from_config

    assert settings_from_config(RunConfig.of(norm="bn").privacy) is None  # dp-sgd off
    keys = {"dp_sgd": True, "dp_noise_multiplier": 0.0, "dp_target_epsilon": 8.0, "dp_max_grad_norm": 1.5,
            "dp_delta": 1e-5, "dp_accountant": "prv"}
    s = settings_from_config(RunConfig.of(norm="gn", **keys).privacy)
    assert (s.target_epsilon, s.noise_multiplier, s.max_grad_norm, s.accountant) == (8.0, None, 1.5, "prv")
    with pytest.raises(FedknError, match="kn, gn"):  # these run in config validation
        RunConfig.of(norm="bn", **keys)
    with pytest.raises(FedknError, match="exactly one"):
        RunConfig.of(norm="gn", **{**keys, "dp_noise_multiplier": 1.0})
