"""The error codes client and server share, and a divergence keeping its type end to end."""

from __future__ import annotations

from pathlib import Path

from flwr.common.constant import ErrorCode

from fedkn.app.runner import _located
from fedkn.errors import DivergedError, FedknError
from fedkn.protocol import ERROR_CODE_CLIENT, ERROR_CODE_DIVERGED, LOST_NODE_CODES


def test_flower_error_codes_are_the_ones_fedkn_restates():
    # Fails loudly when a Flower upgrade renumbers its codes (flwr 1.41 does not export them publicly).
    assert ErrorCode.CLIENT_APP_RAISED_EXCEPTION == ERROR_CODE_CLIENT
    lost = {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE}
    assert lost == LOST_NODE_CODES
    flower_codes = {v for k, v in vars(ErrorCode).items() if k.isupper()}
    assert ERROR_CODE_DIVERGED not in flower_codes


def test_the_runner_appends_the_location_and_keeps_a_divergence_typed(tmp_path: Path):
    where = f"results so far: {tmp_path}"
    located = _located(DivergedError("training diverged (loss nan); lower lr"), where)
    assert isinstance(located, DivergedError)
    assert located.reason == "training diverged (loss nan); lower lr"
    assert str(located) == f"training diverged (loss nan); lower lr ({where})"
    other = _located(FedknError("batch size 1 does not work with BatchNorm"), where)
    assert type(other) is FedknError and str(other).endswith(f"({where})")
