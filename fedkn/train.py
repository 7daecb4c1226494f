"""Local training and evaluation as plain PyTorch functions (no Flower here).

The Flower ClientApp, the server's centralized evaluation and any plain-loop benchmark call these
same functions. The pieces a wrapper may want to replace are small separate functions:
:func:`make_optimizer` (e.g. an Opacus ``DPOptimizer`` around it), :func:`make_batches` (e.g.
Poisson sampling) and :func:`train_step` (one SGD step, with the FedProx proximal term); pass
replacements through ``train_local``'s ``make_optimizer_fn`` / ``make_batches_fn`` /
``train_step_fn`` arguments (:mod:`fedkn.privacy.dpsgd` replaces all three for DP-SGD).

Two training rules are switches of :func:`train_local`: ``agc_clip`` (adaptive gradient clipping,
:mod:`fedkn.agc`; the ``nf`` norm trains with it) and ``freeze_batchnorm_stats`` (FixBN's second
phase, :mod:`strategies.fixbn`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedkn import agc
from fedkn.cache import WORKER_CACHE
from fedkn.data import ImageDataset, iterate_batches
from fedkn.errors import DivergedError, FedknError
from fedkn.nn.batchnorm import batchnorm_modules, has_batchnorm

#: ``(uint8 images, generator) -> float model input`` (``fedkn.data.Preprocess`` is one).
PreprocessFn = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the examples seen (without the proximal term)
    accuracy: float  # running training accuracy over the examples seen
    num_examples: int  # size of the local training set (the FedAvg weight)
    steps: int  # optimizer steps taken


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


@WORKER_CACHE.memo("device", 1)
def default_device() -> torch.device:
    """The GPU when one is visible, the CPU otherwise; decided once per process."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_label(device: torch.device) -> str:
    """``device`` with what decides its rounding: the CPU's vector capability (torch picks its
    kernels by it, KernelNorm's fused kernel is compiled for it) or the GPU's name. Runs with the
    same seed agree bit for bit only where this label is the same."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.backends.cpu.get_cpu_capability()})"


def check_batch_size(model: nn.Module, batch_size: int) -> None:
    """Reject batch size 1 up front for models whose normalization needs a batch (BatchNorm)."""
    if batch_size < 1:
        raise FedknError(f"batch size must be at least 1, got {batch_size}")
    if batch_size == 1 and has_batchnorm(model):
        from fedkn.nn.norms import NORMS

        independent = ", ".join(n for n, spec in NORMS.items() if spec.batch_independent)
        raise FedknError(
            "batch size 1 does not work with BatchNorm (it normalizes over the batch); "
            f"use batch size >= 2 or a batch-independent norm: {independent}"
        )


def use_frozen_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: it normalizes with its running statistics and stops
    updating them, while its affine parameters (and everything else) still train."""
    for _, m in batchnorm_modules(model):
        m.eval()


def make_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_batches(
    dataset: ImageDataset,
    indices: np.ndarray,
    *,
    batch_size: int,
    generator: torch.Generator | None,
    preprocess: PreprocessFn,
) -> Batches:
    """One shuffled pass (epoch) over ``dataset[indices]``."""
    return iterate_batches(
        dataset, indices, batch_size, shuffle=True, generator=generator, preprocess=preprocess
    )


def _cycle_batches(
    make_epoch: Callable[[], Batches], *, epochs: int, steps: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``epochs`` passes, or exactly ``steps`` batches (as many passes as that takes)."""
    if steps is None:
        for _ in range(epochs):
            yield from make_epoch()
        return
    taken = 0
    while taken < steps:
        produced = False
        for batch in make_epoch():
            produced = True
            yield batch
            taken += 1
            if taken >= steps:
                return
        if not produced:
            return


def proximal_term(model: nn.Module, global_params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """FedProx: ``sum ||w - w_global||^2`` over the trainable parameters (times mu/2 by the caller)."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, p in model.named_parameters():
        if p.requires_grad and name in global_params:
            total = total + (p - global_params[name]).pow(2).sum()
    return total


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    proximal_mu: float = 0.0,
    global_params: Mapping[str, torch.Tensor] | None = None,
) -> tuple[float, int]:
    """One optimizer step; returns (summed cross-entropy over the batch, correct predictions)."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    objective = loss
    if proximal_mu > 0.0 and global_params is not None:
        objective = loss + 0.5 * proximal_mu * proximal_term(model, global_params)
    objective.backward()
    optimizer.step()
    correct = int((logits.detach().argmax(1) == y).sum())
    return float(loss.detach()) * y.numel(), correct


def _check_local_args(model: nn.Module, batch_size: int, epochs: int, steps: int | None, agc_clip: float) -> None:
    """Reject local-training settings that cannot run, before any work."""
    check_batch_size(model, batch_size)
    if steps is not None and steps < 1:
        raise FedknError(f"local steps must be at least 1, got {steps}")
    if epochs < 1:
        raise FedknError(f"local epochs must be at least 1, got {epochs}")
    if agc_clip < 0:
        raise FedknError(f"agc clip must be 0 (off) or positive, got {agc_clip}")


def train_local(
    model: nn.Module,
    dataset: ImageDataset,
    indices: np.ndarray,
    *,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    epochs: int = 1,
    steps: int | None = None,
    proximal_mu: float = 0.0,
    global_params: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    preprocess: PreprocessFn,
    agc_clip: float = 0.0,
    freeze_batchnorm_stats: bool = False,
    make_optimizer_fn: Callable[..., torch.optim.Optimizer] = make_optimizer,
    make_batches_fn: Callable[..., Batches] = make_batches,
    train_step_fn: Callable[..., tuple[float, int]] = train_step,
) -> TrainResult:
    """Train ``model`` in place on ``dataset[indices]``: ``epochs`` passes, or ``steps`` SGD steps.

    ``global_params`` (name -> tensor) are the weights the round started from, needed when
    ``proximal_mu > 0`` (FedProx); by default they are snapshotted here before training.
    ``generator`` drives shuffling and augmentation, so a seeded generator makes the run repeatable.
    ``agc_clip > 0`` clips every step's gradient unit-wise to that ratio (:mod:`fedkn.agc`).
    ``freeze_batchnorm_stats`` trains with BatchNorm normalizing by the running statistics the model
    arrived with, leaving them unchanged (FixBN, :mod:`strategies.fixbn`).
    """
    _check_local_args(model, batch_size, epochs, steps, agc_clip)
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    indices = np.asarray(indices)
    if indices.size == 0:
        return TrainResult(loss=0.0, accuracy=0.0, num_examples=0, steps=0)
    if proximal_mu > 0.0 and global_params is None:
        global_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    elif global_params is not None:
        global_params = {n: t.detach().to(device) for n, t in global_params.items()}

    optimizer = make_optimizer_fn(model, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if agc_clip > 0:
        agc.attach(optimizer, model, agc_clip)
    # BatchNorm cannot train on a batch of one (unless it uses frozen statistics); such a trailing batch is skipped.
    skip_singletons = has_batchnorm(model) and not freeze_batchnorm_stats

    def one_epoch() -> Batches:
        return make_batches_fn(dataset, indices, batch_size=batch_size, generator=generator, preprocess=preprocess)

    model.train()
    if freeze_batchnorm_stats:
        use_frozen_batchnorm(model)
    loss_sum, correct, seen, taken = 0.0, 0, 0, 0
    for x, y in _cycle_batches(one_epoch, epochs=epochs, steps=steps):
        if skip_singletons and y.numel() < 2:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        batch_loss, batch_correct = train_step_fn(
            model, optimizer, x, y, proximal_mu=proximal_mu, global_params=global_params
        )
        if not math.isfinite(batch_loss):
            raise DivergedError(
                f"training diverged (loss {batch_loss / max(1, y.numel())}) at local step {taken + 1}; lower lr"
            )
        loss_sum += batch_loss
        correct += batch_correct
        seen += y.numel()
        taken += 1
    return TrainResult(
        loss=loss_sum / seen if seen else 0.0,
        accuracy=correct / seen if seen else 0.0,
        num_examples=int(indices.size),
        steps=taken,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    indices: np.ndarray | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    preprocess: PreprocessFn | None = None,
) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on ``dataset[indices]`` (all if None)."""
    if preprocess is None:
        raise FedknError("evaluate needs a preprocess function (see fedkn.data.preprocess_for)")
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    if idx.size == 0:
        return EvalResult(loss=0.0, accuracy=0.0, num_examples=0)
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        for x, y in iterate_batches(dataset, idx, batch_size, shuffle=False, generator=None, preprocess=preprocess):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return EvalResult(loss=loss_sum / idx.size, accuracy=correct / idx.size, num_examples=int(idx.size))

