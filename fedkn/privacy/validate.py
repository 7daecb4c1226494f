"""Up-front checks that a model can be trained with DP-SGD, in the style of Opacus' ModuleValidator.

Every problem is one :class:`~fedkn.errors.FedknError` saying what to change, raised before any
training starts (on the server, from the config; on the client, from the built model):

- **BatchNorm** (any ``_BatchNorm``, SyncBatchNorm included): it normalizes a sample with the
  statistics of its batch, so a sample's gradient depends on the other samples and per-sample
  clipping bounds nothing. The message names the batch-independent norms of the registry.
- **Buffers in a trainable layer** (e.g. InstanceNorm with running statistics): the buffers are
  updated from the data without noise and are shipped with the model.
- **Whatever Opacus' own validators reject** (LSTM/GRU/MultiheadAttention without the DP
  replacements, ...), with Opacus' reason.
- **A subclass of a layer with a per-sample-gradient rule whose own type has no rule.** Opacus picks
  rules by exact type, so such a layer would silently fall back to functorch, which is wrong
  whenever the subclass changes the computation (and always for layers that use randomness).
- Optionally (``example_input``): a dry run on a copy of the model that checks every trainable
  parameter actually gets a per-sample gradient of the right shape.
"""

from __future__ import annotations

import copy

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.validators import ModuleValidator
from opacus.validators.errors import IllegalModuleConfigurationError
from torch import Tensor, nn

from fedkn.errors import FedknError
from fedkn.nn.batchnorm import batchnorm_modules
from fedkn.privacy import grad_sample as _rules  # noqa: F401 - registers the KNConv2d/WSConv2d rules


def batch_independent_norms() -> list[str]:
    """Registry names of the norms usable with DP-SGD (every norm but BatchNorm)."""
    from fedkn.nn.norms import NORMS

    return [name for name, spec in NORMS.items() if spec.batch_independent]


def _bn_message(where: str) -> str:
    alternatives = ", ".join(batch_independent_norms())
    return (
        f"{where} uses BatchNorm, which cannot be trained with differential privacy: it normalizes each "
        "sample with statistics of its whole batch, so per-sample gradients (and their clipping) are "
        f"undefined; use a batch-independent norm instead: {alternatives} (e.g. norm = \"kn\" or \"gn\")"
    )


def check_norm(norm: str) -> None:
    """Reject a norm *name* for DP-SGD (for config validation, before any model is built)."""
    from fedkn.nn.norms import NORMS

    spec = NORMS.get(norm)
    if spec is None:
        raise FedknError(f"unknown norm '{norm}'; valid norms: {', '.join(NORMS)}")
    if not spec.batch_independent:
        raise FedknError(_bn_message(f"norm '{norm}'"))


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def validate_model(model: nn.Module, *, example_input: Tensor | None = None) -> None:
    """Raise :class:`FedknError` if ``model`` cannot be trained with DP-SGD (see module docstring).

    ``example_input``: a batch (at least 2 samples) for a dry run on a deep copy of the model,
    which catches layers that Opacus accepts but cannot compute per-sample gradients for.
    """
    for name, _ in batchnorm_modules(model):
        raise FedknError(_bn_message(f"the model (layer '{name}')"))
    for name, m in model.named_modules():
        if _trainable(m) and any(True for _ in m.buffers(recurse=False)):
            buffers = ", ".join(n for n, _ in m.named_buffers(recurse=False))
            raise FedknError(
                f"layer '{name}' ({type(m).__name__}) has trainable parameters and data-dependent buffers "
                f"({buffers}) that DP-SGD cannot protect; use a layer without running statistics"
            )
    was_training = model.training
    model.train()
    try:
        errors = [e for e in ModuleValidator.validate(model, strict=False)
                  if not isinstance(e, IllegalModuleConfigurationError)]
    finally:
        model.train(was_training)
    if errors:
        first = str(errors[0]).strip().splitlines()[0]
        raise FedknError(f"Opacus cannot train this model with differential privacy: {first}")
    rules = GradSampleHooks.GRAD_SAMPLERS
    for name, m in model.named_modules():
        if not _trainable(m) or type(m) in rules:
            continue
        parent = next((base for base in type(m).__mro__[1:] if base in rules), None)
        if parent is not None:
            raise FedknError(
                f"layer '{name}' is a {type(m).__name__}, a subclass of {parent.__name__} without its own "
                "per-sample-gradient rule; register one with opacus.grad_sample.register_grad_sampler "
                f"or use {parent.__name__} itself"
            )
    if example_input is not None:
        _dry_run(model, example_input)


def _dry_run(model: nn.Module, example_input: Tensor) -> None:
    from fedkn.privacy.grad_sample import attach, detach

    if example_input.shape[0] < 2:
        raise ValueError("example_input needs at least 2 samples")
    probe = copy.deepcopy(model)
    probe.train()
    attach(probe, loss_reduction="sum")
    n = example_input.shape[0]
    try:
        out = probe(example_input)
        out.float().square().sum().backward()
        for name, p in probe.named_parameters():
            if not p.requires_grad:
                continue
            gs = getattr(p, "grad_sample", None)
            if not isinstance(gs, torch.Tensor) or tuple(gs.shape) != (n, *p.shape):
                raise FedknError(
                    f"Opacus computes no per-sample gradient for parameter '{name}'; its layer is not "
                    "supported under differential privacy"
                )
    except FedknError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here means the layer is unsupported
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FedknError(f"Opacus cannot compute per-sample gradients for this model: {line}") from None
    finally:
        detach(probe)


__all__ = ["batch_independent_norms", "check_norm", "validate_model"]
