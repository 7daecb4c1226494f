"""What the client and the server both build from a RunConfig: data, model, preprocessing, seeds.

No Flower here; cached per process (a Ray worker serves many clients and rounds).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedkn.cache import WORKER_CACHE
from fedkn.config import RunConfig
from fedkn.data import Federation, ImageDataset, Preprocess, build_federation, preprocess_for
from fedkn.errors import FedknError
from fedkn.models import build
from fedkn.nn.norms import NORMS


def federation(cfg: RunConfig) -> Federation:
    """The run's partitioned data (``fedkn.data`` caches it per process)."""
    return build_federation(
        cfg.data.dataset,
        cfg.data.num_clients,
        cfg.data.partition,
        cfg.run.seed,
        data_dir=cfg.data.data_dir or None,
        test_fraction=cfg.data.test_fraction,
        val_fraction=cfg.data.val_fraction,
    )


def new_model(cfg: RunConfig, dataset: ImageDataset) -> nn.Module:
    """The run's model, initialized from the run seed (same weights in every run with that seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return build(
            cfg.model.name,
            cfg.model.norm,
            num_classes=dataset.num_classes,
            in_channels=dataset.in_channels,
            width=cfg.model.width,
            image_size=dataset.image_size,
        )


@WORKER_CACHE.memo("models", 2)
def cached_model(cfg: RunConfig) -> nn.Module:
    """One model object per process and config, reloaded with new weights for every message."""
    return new_model(cfg, federation(cfg).train_set)


def preprocess(cfg: RunConfig, dataset: ImageDataset, *, train: bool) -> Preprocess:
    """Raw [0, 1] pixels for KernelNorm models, mean/std-normalized pixels for the others."""
    return preprocess_for(dataset, normalize=not NORMS[cfg.model.norm].raw_pixels, augment=cfg.data.augment and train)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state_dict; a mismatch (other model/norm/width) is one clear line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise FedknError(
            f"weights do not fit the model ({len(missing)} missing, {len(unexpected)} unexpected keys, "
            f"e.g. {(missing or unexpected)[0]!r}); were they made with another model, norm or width?"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise FedknError(f"weights do not fit the model: '{k}' has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)


def client_seed(cfg: RunConfig, server_round: int, partition_id: int) -> int:
    """One 63-bit seed per (run seed, round, client): local shuffling, augmentation, KN dropout."""
    seq = np.random.SeedSequence([cfg.run.seed, server_round, partition_id, 0x6B6E])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
