"""FixBN: exploration as FedAvg+BN, then BatchNorm statistics frozen at the global model's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkn.compare.grid import Cell, cell_config, norm_label, parse_norms
from fedkn.config import RunConfig
from fedkn.data import load_dataset, preprocess_for
from fedkn.errors import FedknError
from fedkn.models import build
from fedkn.nn.batchnorm import batchnorm_stat_keys
from fedkn.train import train_local
from strategies import stats_frozen


def _bn_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("resnet8", "bn", in_channels=1, width=0.125)


def test_config_fixbn_is_bn_with_the_fixbn_rule_and_half_the_rounds_by_default():
    cfg = RunConfig.from_sources(sets=["norm=fixbn", "num-rounds=9"])
    assert (cfg.model.norm, cfg.federation.strategy, cfg.federation.fixbn_freeze_after) == ("bn", "fixbn", 4)
    assert RunConfig.of(norm="fixbn", fixbn_round=2).federation.fixbn_freeze_after == 2
    assert RunConfig.from_flower({**RunConfig().to_flower(), "norm": "fixbn"}).federation.strategy == "fixbn"
    assert [stats_frozen(cfg.federation, r) for r in range(1, 10)] == [False] * 4 + [True] * 5
    assert not stats_frozen(RunConfig.of(norm="bn").federation, 99)  # plain BN never freezes
    with pytest.raises(FedknError, match="norm 'fixbn' means norm 'bn' with strategy 'fixbn'"):
        RunConfig.from_sources(sets=["norm=fixbn", "strategy=fedprox"])
    with pytest.raises(FedknError, match="strategy 'fixbn' freezes the global BatchNorm statistics"):
        RunConfig.from_sources(sets=["norm=gn", "strategy=fixbn"])
    with pytest.raises(FedknError, match="'fixbn-round' must be 0"):
        RunConfig.from_sources(sets=["norm=fixbn", "fixbn-round=-1"])
    # In a comparison grid it is a norm label, like fedbn.
    assert parse_norms("kn,fixbn,nf") == ["kn", "fixbn", "nf"]
    cell_cfg = cell_config(RunConfig(), Cell("fixbn", "iid", 0))
    assert (cell_cfg.model.norm, cell_cfg.federation.strategy, norm_label(cell_cfg)) == ("bn", "fixbn", "fixbn")


def test_frozen_local_training_normalizes_with_the_global_statistics_and_leaves_them_unchanged():
    ds = load_dataset("digits", "train")
    pre = preprocess_for(ds, normalize=True, augment=False)
    model = _bn_model()
    # Global statistics as after exploration: anything but the initial (0, 1).
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    stat_keys = batchnorm_stat_keys(model)

    train_local(model, ds, np.arange(24), batch_size=8, lr=0.05, device="cpu", preprocess=pre,
                generator=torch.Generator().manual_seed(0), freeze_batchnorm_stats=True)
    after = model.state_dict()
    for k in stat_keys:  # unchanged, so BatchNorm used them (in training mode it would update them)
        assert torch.equal(after[k], global_state[k]), k
    bn_weights = [k for k in after if k.endswith(".weight") and k.replace("weight", "running_mean") in after]
    assert any(not torch.equal(after[k], global_state[k]) for k in bn_weights)  # affine parameters still train
    # Without the switch the same training moves the statistics (what the exploration rounds do).
    model.load_state_dict(global_state)
    train_local(model, ds, np.arange(24), batch_size=8, lr=0.05, device="cpu", preprocess=pre,
                generator=torch.Generator().manual_seed(0))
    assert any(not torch.equal(model.state_dict()[k], global_state[k]) for k in stat_keys)


@pytest.mark.slow
def test_fixbn_run_freezes_the_statistics_of_round_fixbn_round(tmp_path, monkeypatch):
    """End to end (3 clients, tiny): the statistics after round 3 of 3 equal those after round 1."""
    from fedkn.cli import main
    from fedkn.results import load_checkpoint

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    tiny = ["--norm", "fixbn", "--set", "num-clients=3", "--set", "width=0.125", "--set", "local-steps=5",
            "--set", "fixbn-round=1", "--set", "eval-every=3", "--set", f"output-dir={tmp_path / 'runs'}"]
    try:
        assert main(["run", *tiny, "--set", "num-rounds=1", "--set", "name=one"]) == 0
        assert main(["run", *tiny, "--set", "num-rounds=3", "--set", "name=three"]) == 0
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    one, three = (load_checkpoint(next((tmp_path / "runs").glob(f"*-{n}")) / "model.pt").model for n in ("one", "three"))
    stats = [k for k in one if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats
    for k in stats:
        assert torch.equal(one[k], three[k]), k
    assert any(not torch.equal(one[k], three[k]) for k in one if k not in stats)  # the rest trained on
