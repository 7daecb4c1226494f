"""Sample-level DP: DP-SGD in one client's local training (Opacus, Poisson sampling).

:func:`make_private` validates the model and returns a :class:`PrivateTraining` whose methods
drop into :func:`fedkn.train.train_local`'s replaceable pieces:

- ``make_optimizer``: the usual SGD wrapped in Opacus' ``DPOptimizer`` (per-sample clipping to
  ``max_grad_norm``, Gaussian noise ``noise_multiplier * max_grad_norm`` on the sum, division by
  the *expected* batch size), after attaching Opacus' hooks to the model in place
  (:func:`fedkn.privacy.grad_sample.attach`; the model is not wrapped, so its ``state_dict`` keys
  stay the same).
- ``make_batches``: Poisson sampling over the client's in-memory train indices, as DP-SGD's
  accounting assumes: every step includes each example independently with probability ``q``, so
  batches have varying size and may be empty.
- ``train_step``: one DP-SGD step. An empty batch still takes a step (noise only): skipping it
  would make the output depend on whether a batch was empty, which the accounting does not cover.
  FedProx's proximal gradient ``mu * (w - w_global)`` is data independent and is added after the
  noise (Opacus' hooks never see it, so otherwise it would be dropped silently).

Sampling plan, following Opacus' ``DPDataLoader``: with ``n`` examples and batch size ``B`` an
epoch is ``ceil(n / B)`` steps and the sampling rate is ``q = 1 / ceil(n / B)`` (expected batch
``n*q <= B``; a client with fewer than ``B`` examples trains on Poisson samples with ``q = 1``,
i.e. its whole dataset every step, with no amplification). Steps per round are ``local_steps`` if
set, else ``local_epochs * ceil(n / B)``.

Noise: given directly (``noise_multiplier``), or calibrated (``target_epsilon``) so that a client
that trains in *every* planned round stays within ``(target_epsilon, delta)``: the plan is
``rounds * steps_per_round`` steps at rate ``q``. Clients differ in ``n``, hence in ``q`` and
in the calibrated noise; each meets the target.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn

from fedkn.errors import FedknError
from fedkn.privacy import accounting
from fedkn.privacy.grad_sample import attach, detach
from fedkn.privacy.validate import validate_model
from fedkn.protocol import DP_EPSILON, DP_EPSILON_ROUND

if TYPE_CHECKING:  # config validation calls into this module
    from fedkn.config import PrivacyConfig


@dataclass(frozen=True)
class DPSettings:
    """Sample-level DP settings of a run: give ``noise_multiplier`` or ``target_epsilon``, not both."""

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    #: Opacus' secure noise generation (slower; guards against floating-point attacks).
    secure_mode: bool = False

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise FedknError("DP-SGD needs exactly one of noise multiplier and target epsilon")
        if self.noise_multiplier is not None and not (0.0 <= self.noise_multiplier < math.inf):
            raise FedknError(f"DP noise multiplier must be >= 0, got {self.noise_multiplier!r}")
        if self.target_epsilon is not None and not (0.0 < self.target_epsilon < math.inf):
            raise FedknError(f"DP target epsilon must be positive, got {self.target_epsilon!r}")
        if not (0.0 < self.max_grad_norm < math.inf):
            raise FedknError(f"DP max grad norm (per-sample clipping bound) must be positive, got {self.max_grad_norm!r}")
        accounting.check_delta(self.delta)
        accounting.check_accountant(self.accountant)


def poisson_plan(num_samples: int, batch_size: int, *, local_epochs: int = 1, local_steps: int = 0) -> tuple[float, int]:
    """``(sample_rate, steps_per_round)`` for a client with ``num_samples`` examples (module docstring)."""
    if num_samples < 1:
        raise FedknError("a client without training examples cannot run DP-SGD")
    if batch_size < 1:
        raise FedknError(f"batch size must be at least 1, got {batch_size}")
    if local_steps < 0 or local_epochs < 1:
        raise FedknError("local steps must be >= 0 and local epochs >= 1")
    steps_per_epoch = math.ceil(num_samples / batch_size)
    return 1.0 / steps_per_epoch, (local_steps or local_epochs * steps_per_epoch)


def resolve_noise(settings: DPSettings, sample_rate: float, steps_per_round: int, rounds: int) -> float:
    """The noise multiplier: as given, or calibrated for ``rounds * steps_per_round`` steps."""
    if settings.noise_multiplier is not None:
        return float(settings.noise_multiplier)
    if rounds < 1:
        raise FedknError(f"planned rounds must be at least 1, got {rounds}")
    return accounting.calibrate_noise(
        settings.target_epsilon, settings.delta, sample_rate, rounds * steps_per_round, settings.accountant  # type: ignore[arg-type]
    )


def poisson_batches(
    dataset: Any,
    indices: np.ndarray | Tensor,
    *,
    sample_rate: float,
    steps: int,
    generator: torch.Generator | None,
    preprocess: Any,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``steps`` Poisson batches of ``dataset[indices]``: each example in each batch with prob. ``q``.

    Yields ``(float32 inputs (B, C, H, W), int64 labels (B,))`` with ``B`` varying and possibly 0
    (then the inputs are an empty ``(0, C, H, W)`` tensor and ``preprocess`` is not called).
    ``generator`` drives the sampling and the augmentation, like :func:`fedkn.data.iterate_batches`.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise FedknError(f"sampling rate must be in (0, 1], got {sample_rate}")
    order = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    if order.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {tuple(order.shape)}")
    shape = tuple(dataset.images.shape[1:])
    for _ in range(steps):
        chosen = order[torch.rand(order.numel(), generator=generator) < sample_rate]
        if chosen.numel() == 0:
            yield torch.empty((0, *shape), dtype=torch.float32), torch.empty((0,), dtype=torch.int64)
        else:
            yield preprocess(dataset.images[chosen], generator), dataset.labels[chosen]


@dataclass
class PrivateTraining:
    """DP-SGD for one client's local training in one round (see module docstring)."""

    settings: DPSettings
    num_samples: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    #: Opacus divides the noisy sum by this (``n * q``), not by the actual batch size.
    expected_batch_size: int
    noise_generator: torch.Generator | None = None
    steps_taken: int = 0
    optimizer: DPOptimizer | None = None
    _model: nn.Module | None = field(default=None, repr=False)

    # -- train_local's replaceable pieces ---------------------------------------------------------
    def make_optimizer(self, model: nn.Module, *, lr: float, momentum: float, weight_decay: float) -> DPOptimizer:
        """``make_optimizer_fn``: attach Opacus' hooks to ``model`` and wrap SGD in a DPOptimizer."""
        from fedkn.train import make_optimizer

        attach(model, loss_reduction="mean")
        self._model = model
        base = make_optimizer(model, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.optimizer = DPOptimizer(
            base,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=self.noise_generator,
            secure_mode=self.settings.secure_mode,
        )
        return self.optimizer

    def make_batches(
        self, dataset: Any, indices: np.ndarray, *, batch_size: int, generator: torch.Generator | None, preprocess: Any
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``make_batches_fn``: one expected epoch (``1/q`` steps) of Poisson batches.

        ``batch_size`` is ignored: the plan fixed the sampling rate. Pass
        ``steps=self.steps_per_round`` to ``train_local`` so a round takes exactly the planned steps.
        """
        per_epoch = max(1, round(1.0 / self.sample_rate))
        return poisson_batches(dataset, indices, sample_rate=self.sample_rate, steps=per_epoch,
                               generator=generator, preprocess=preprocess)

    def train_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x: Tensor,
        y: Tensor,
        *,
        proximal_mu: float = 0.0,
        global_params: Mapping[str, Tensor] | None = None,
    ) -> tuple[float, int]:
        """``train_step_fn``: one DP-SGD step; returns (summed loss over the batch, correct predictions)."""
        if not isinstance(optimizer, DPOptimizer):
            raise FedknError("DP-SGD steps need the optimizer from PrivateTraining.make_optimizer")
        optimizer.zero_grad(set_to_none=True)
        n = int(y.numel())
        if n == 0:  # noise-only step: empty per-sample gradients, Opacus sums them to zero
            for p in optimizer.params:
                p.grad_sample = p.new_zeros((0, *p.shape))
            loss_sum, correct = 0.0, 0
        else:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            loss_sum = float(loss.detach()) * n
            correct = int((logits.detach().argmax(1) == y).sum())
        if optimizer.pre_step():  # clip, accumulate, add noise, scale by the expected batch size
            if proximal_mu > 0.0 and global_params is not None:
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if p.requires_grad and p.grad is not None and name in global_params:
                            p.grad.add_(p - global_params[name].to(p.device), alpha=proximal_mu)
            optimizer.original_optimizer.step()
            self.steps_taken += 1
        return loss_sum, correct

    # -- after training -----------------------------------------------------------------------------
    def close(self) -> None:
        """Remove Opacus' hooks and per-sample state from the model (it is reused next round)."""
        if self._model is not None:
            detach(self._model)
            for p in self._model.parameters():
                p.grad = None
        self._model = None
        self.optimizer = None

    def round_epsilon(self) -> float:
        """Epsilon of the steps taken so far in this round alone."""
        return accounting.dpsgd_epsilon(self.noise_multiplier, self.sample_rate, self.steps_taken,
                                        self.settings.delta, self.settings.accountant)

    def record(self, ledger: accounting.PrivacyLedger, server_round: int) -> None:
        """Add this round's steps to the client's ledger."""
        ledger.record(server_round, self.noise_multiplier, self.sample_rate, self.steps_taken)

    def new_ledger(self) -> accounting.PrivacyLedger:
        return accounting.PrivacyLedger(self.settings.delta, self.settings.accountant)

    def metrics(self, ledger: accounting.PrivacyLedger | None = None) -> dict[str, float | int]:
        """Flat metrics for the client's reply (kebab-case like the other train metrics)."""
        out: dict[str, float | int] = {
            DP_EPSILON_ROUND: self.round_epsilon(),
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-sample-rate": self.sample_rate,
            "dp-steps": self.steps_taken,
        }
        if ledger is not None:
            out[DP_EPSILON] = ledger.epsilon()
            out["dp-rounds"] = ledger.rounds_participated
        return out


def make_private(
    model: nn.Module,
    *,
    num_samples: int,
    batch_size: int,
    settings: DPSettings,
    local_epochs: int = 1,
    local_steps: int = 0,
    rounds: int = 1,
    noise_generator: torch.Generator | None = None,
) -> PrivateTraining:
    """Validate ``model`` for DP-SGD and plan one client's private local training.

    ``rounds`` is the run's planned number of rounds (used only to calibrate noise to
    ``settings.target_epsilon``). Hooks are attached when ``make_optimizer`` is called and removed
    by ``close``.
    """
    validate_model(model)
    sample_rate, steps = poisson_plan(num_samples, batch_size, local_epochs=local_epochs, local_steps=local_steps)
    sigma = resolve_noise(settings, sample_rate, steps, rounds)
    return PrivateTraining(
        settings=settings,
        num_samples=int(num_samples),
        sample_rate=sample_rate,
        steps_per_round=steps,
        noise_multiplier=sigma,
        expected_batch_size=max(1, round(num_samples * sample_rate)),
        noise_generator=noise_generator,
    )


def settings_from_config(privacy: PrivacyConfig) -> DPSettings | None:
    """:class:`DPSettings` from a run's ``dp-*`` keys (its privacy sub-config); ``None`` when
    ``dp-sgd`` is off. A 0 noise multiplier or target epsilon means "not given"."""
    if not privacy.enabled:
        return None
    sigma, target = privacy.noise_multiplier, privacy.target_epsilon
    return DPSettings(
        max_grad_norm=privacy.max_grad_norm,
        noise_multiplier=sigma if sigma > 0 else None,
        target_epsilon=target if target > 0 else None,
        delta=privacy.delta,
        accountant=privacy.accountant,
    )


__all__ = [
    "DPSettings",
    "PrivateTraining",
    "make_private",
    "poisson_batches",
    "poisson_plan",
    "resolve_noise",
    "settings_from_config",
]
