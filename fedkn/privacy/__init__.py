"""Differential privacy for fedkn: sample-level DP-SGD on each client (Opacus) and its accounting.

- :mod:`fedkn.privacy.validate`: reject models DP-SGD cannot train (BatchNorm first of all).
- :mod:`fedkn.privacy.grad_sample`: per-sample-gradient rules for KNConv2d and WSConv2d,
  registered with Opacus on import, and :func:`attach`/:func:`detach` of Opacus' hooks.
- :mod:`fedkn.privacy.dpsgd`: :func:`make_private` (DPOptimizer, Poisson batches, noise given or
  calibrated to a target epsilon) for :func:`fedkn.train.train_local`.
- :mod:`fedkn.privacy.accounting`: epsilon per client per round and cumulative (RDP, PRV, GDP).

Client-level DP (Flower's DP strategy wrappers) lives in :mod:`strategies.dp`.
"""

from fedkn.privacy import _opacus  # noqa: F401 - first: imports Opacus without its log handler
from fedkn.privacy.accounting import ACCOUNTANTS, PrivacyLedger, calibrate_noise, dpsgd_epsilon, epsilon
from fedkn.privacy.dpsgd import DPSettings, PrivateTraining, make_private, poisson_batches, poisson_plan
from fedkn.privacy.grad_sample import attach, detach, per_sample_gradients
from fedkn.privacy.validate import batch_independent_norms, check_norm, validate_model

__all__ = [
    "ACCOUNTANTS",
    "DPSettings",
    "PrivacyLedger",
    "PrivateTraining",
    "attach",
    "batch_independent_norms",
    "calibrate_noise",
    "check_norm",
    "detach",
    "dpsgd_epsilon",
    "epsilon",
    "make_private",
    "per_sample_gradients",
    "poisson_batches",
    "poisson_plan",
    "validate_model",
]
