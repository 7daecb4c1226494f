"""FedBN's rule in one place: which keys stay on a client and how its copy rejoins the global model."""

from __future__ import annotations

import torch

from fedkn.config import RunConfig
from fedkn.local_state import local_keys, split_local, with_local
from fedkn.models import build
from fedkn.nn.batchnorm import batchnorm_keys


def _model(norm: str) -> torch.nn.Module:
    return build("resnet8", norm, num_classes=10, in_channels=1, width=0.125)


def test_only_fedbn_keeps_keys_local_and_they_are_every_batchnorm_key():
    bn = _model("bn")
    assert local_keys(RunConfig.of(norm="fedbn").federation, bn) == batchnorm_keys(bn) != []
    assert local_keys(RunConfig.of(norm="bn").federation, bn) == [] and local_keys(RunConfig.of(norm="fixbn").federation, bn) == []
    assert local_keys(RunConfig.of(norm="fedbn").federation, _model("kn")) == []  # rejected by config validation anyway


def test_a_clients_copy_replaces_exactly_the_local_keys_and_split_undoes_it():
    model = _model("bn")
    keys = batchnorm_keys(model)
    state = model.state_dict()
    sent = {k: v for k, v in state.items() if k not in keys}  # what the server sends
    own = {k: torch.full_like(state[k], 7) for k in keys}
    merged = with_local(sent, own, keys)
    assert set(merged) == set(state) and all(torch.equal(merged[k], own[k]) for k in keys)
    assert all(merged[k] is sent[k] for k in sent)
    shared, kept = split_local(merged, keys)
    assert set(shared) == set(sent) and set(kept) == set(keys)
    assert all(torch.equal(kept[k], own[k]) and kept[k] is not own[k] for k in keys)  # copies, not views
