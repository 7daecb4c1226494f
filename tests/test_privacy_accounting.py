"""Accounting: fedkn's epsilon is Opacus' epsilon; calibration meets its target; ledgers compose rounds."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedkn.errors import FedknError
from fedkn.privacy.accounting import PrivacyLedger, calibrate_noise, compact, dpsgd_epsilon, epsilon

DELTA = 1e-5


def _stepped(acc, rounds):
    """An Opacus accountant stepped one DP-SGD step at a time, as its DPOptimizer hook does."""
    for sigma, q, steps in rounds:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc


@pytest.mark.parametrize("sigma,q,steps", [(1.1, 0.05, 60), (0.8, 0.25, 12), (2.0, 1.0, 5)])
def test_rdp_epsilon_equals_opacus(sigma, q, steps):
    ref = _stepped(RDPAccountant(), [(sigma, q, steps)]).get_epsilon(delta=DELTA)
    assert dpsgd_epsilon(sigma, q, steps, DELTA, "rdp") == ref


def test_prv_epsilon_equals_opacus():
    ref = _stepped(PRVAccountant(), [(1.0, 0.1, 40)]).get_epsilon(delta=DELTA)
    assert dpsgd_epsilon(1.0, 0.1, 40, DELTA, "prv") == pytest.approx(ref, rel=1e-12)


PLAN = {1: (1.0, 0.2, 10), 3: (1.0, 0.2, 10), 4: (1.5, 0.2, 8)}  # trains in rounds 1, 3, 4; noise changes in 4


def _ledger(accountant: str) -> PrivacyLedger:
    ledger = PrivacyLedger(DELTA, accountant)
    for r, (s, q, n) in PLAN.items():
        ledger.record(r, s, q, n)
    return ledger


def test_ledger_cumulative_epsilon_equals_opacus_over_participated_rounds():
    ledger = _ledger("rdp")
    assert ledger.rounds_participated == 3 and ledger.total_steps == 28
    eps = lambda rounds: _stepped(RDPAccountant(), rounds).get_epsilon(delta=DELTA)
    assert ledger.epsilon() == eps(PLAN.values())
    assert ledger.epsilon(up_to_round=3) == eps([PLAN[1], PLAN[3]])
    assert ledger.epsilon(up_to_round=2) == eps([PLAN[1]])  # round 2 without this client costs nothing
    assert ledger.round_epsilon() == eps([PLAN[4]])
    assert ledger.round_epsilon(2) == 0.0
    # Round-trips through a flat record (Flower context.state), and a retried round replaces itself.
    again = PrivacyLedger.from_record(ledger.to_record())
    assert again.epsilon() == ledger.epsilon()
    again.record(4, 1.5, 0.2, 8)
    assert again.rounds_participated == 3


def test_prv_ledger_equals_opacus():
    ref = _stepped(PRVAccountant(), PLAN.values()).get_epsilon(delta=DELTA)
    assert _ledger("prv").epsilon() == pytest.approx(ref, rel=1e-12)
    assert ref < _ledger("rdp").epsilon()  # PRV is the tighter bound


def test_gdp_matches_opacus_and_rejects_changing_parameters():
    from opacus.accountants import GaussianAccountant

    with pytest.warns(UserWarning):
        ref = _stepped(GaussianAccountant(), [(1.0, 0.01, 500)]).get_epsilon(delta=DELTA)
    assert dpsgd_epsilon(1.0, 0.01, 500, DELTA, "gdp") == pytest.approx(ref, rel=1e-12)
    with pytest.raises(FedknError, match="rdp or prv"):
        epsilon([(1.0, 0.01, 5), (2.0, 0.01, 5)], DELTA, "gdp")


@pytest.mark.filterwarnings("ignore:Optimal order")
@pytest.mark.parametrize("accountant,target", [("rdp", 1.0), ("rdp", 8.0)])
def test_calibrated_noise_meets_target(accountant, target):
    q, steps = 0.1, 50
    sigma = calibrate_noise(target, DELTA, q, steps, accountant)
    eps = dpsgd_epsilon(sigma, q, steps, DELTA, accountant)
    assert eps <= target
    assert eps >= target - 0.05  # tight: Opacus' binary search tolerance is 0.01
    assert sigma == get_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps,
                                         accountant=accountant)


def test_more_noise_less_epsilon_and_edge_cases():
    eps = [dpsgd_epsilon(s, 0.1, 30, DELTA) for s in (0.6, 0.9, 1.5, 3.0)]
    assert eps == sorted(eps, reverse=True)
    assert dpsgd_epsilon(0.0, 0.1, 30, DELTA) == math.inf
    assert dpsgd_epsilon(1.0, 0.1, 0, DELTA) == 0.0
    assert compact([(1.0, 0.1, 3), (1.0, 0.1, 0), (1.0, 0.1, 2), (2.0, 0.1, 1)]) == [(1.0, 0.1, 5), (2.0, 0.1, 1)]


def test_bad_inputs_are_fedkn_errors():
    with pytest.raises(FedknError, match="delta"):
        dpsgd_epsilon(1.0, 0.1, 10, 0.0)
    with pytest.raises(FedknError, match="accountant"):
        dpsgd_epsilon(1.0, 0.1, 10, DELTA, "moments")
    with pytest.raises(FedknError, match="sampling rate"):
        dpsgd_epsilon(1.0, 1.5, 10, DELTA)
    with pytest.raises(FedknError, match="target epsilon"):
        calibrate_noise(1e-9, DELTA, 1.0, 10_000)
