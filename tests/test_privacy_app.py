"""Differential privacy through the real app: `fedkn run` (Flower simulation on Ray, in-process)
with DP-SGD on the clients and with client-level DP, resume, and the config errors.

Tiny settings (3 clients, width 0.125, 3 local steps, 2 rounds) keep each run to ~30 s on 2 cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedkn.cli import main
from fedkn.results import TIME_COLUMNS, RunDir, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

TINY = ["--set", "num-clients=3", "--set", "width=0.125", "--set", "batch-size=8", "--set", "local-steps=3",
        "--set", "num-rounds=2", "--set", "client-num-cpus=1", "--set", "round-timeout=120"]
TARGET = 8.0
DP_SGD = ["--set", "dp-sgd=true", "--set", f"dp-target-epsilon={TARGET}", "--set", "dp-delta=1e-5"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _run(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "runs"
    assert main(["run", *TINY, "--set", f"output-dir={out}", *args]) == 0
    return max(out.iterdir())


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _check_dp_sgd_run(run_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(run_dir / "metrics.csv")
    eps = df["dp_epsilon"].to_numpy()
    assert list(df["round"]) == [0, 1, 2]
    assert eps[0] == 0.0 and 0.0 < eps[1] < eps[2] <= TARGET  # cumulative, calibrated to the 2 planned rounds
    assert eps[2] > 0.95 * TARGET  # a client that trained in both rounds spent (almost) the whole budget
    assert (df["dp_epsilon_round"].iloc[1:] > 0).all() and (df["dp_epsilon_round"] <= df["dp_epsilon"]).all()
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["dp_epsilon"] == pytest.approx(eps[2]) and s["dp_delta"] == 1e-5
    assert "sample-level" in s["dp_statement"] and "delta = 1e-05" in s["dp_statement"]
    return df


@pytest.mark.slow
def test_dp_sgd_kn_two_rounds_and_resume_keeps_cumulative_epsilon(tmp_path, capsys):
    # 2 of 3 clients train per round, so some client trains in both rounds (its epsilon composes).
    full = _run(tmp_path, "--norm", "kn", *DP_SGD, "--set", "fraction-train=0.67", "--set", "name=full")
    out = capsys.readouterr().out
    assert "round   2/2" in out and "| eps " in out and "privacy: sample-level (epsilon = " in out
    df_full = _check_dp_sgd_run(full)
    assert (df_full["clients_trained"].iloc[1:] == 2).all()

    # Crash after round 1: a copy of the run with only round 1 on disk. The resumed round 2 runs on
    # fresh clients, whose epsilon must still include the round-1 steps of those that trained then.
    part = tmp_path / "part"
    shutil.copytree(full, part)
    RunDir(part).truncate_metrics(1)
    ckpt = load_checkpoint(part / "model.pt")
    save_checkpoint(part / "model.pt", 1, ckpt.model, ckpt.strategy)
    assert main(["run", "--resume", str(part)]) == 0
    assert "resuming after round 1" in capsys.readouterr().out
    df_part = _check_dp_sgd_run(part)
    privacy = ["round", "clients_trained", "dp_epsilon_round", "dp_epsilon"]
    pd.testing.assert_frame_equal(df_full[privacy], df_part[privacy])
    assert set(TIME_COLUMNS) < set(df_part.columns)

    # The noise was calibrated to 2 rounds: extending the run would break the target.
    assert main(["run", "--resume", str(part), "--set", "num-rounds=3"]) == 2
    err = capsys.readouterr().err
    assert "cannot change num-rounds" in err and "dp-target-epsilon" in err


@pytest.mark.slow
def test_dp_sgd_gn_two_rounds(tmp_path):
    _check_dp_sgd_run(_run(tmp_path, "--norm", "gn", *DP_SGD))


@pytest.mark.slow
def test_client_level_dp_server_fixed_states_the_guarantee(tmp_path, capsys):
    from strategies.dp import client_level_guarantee

    run_dir = _run(tmp_path, "--norm", "gn", "--set", "client-dp=server-fixed", "--set", "client-dp-noise-multiplier=0.5",
                   "--set", "client-dp-clipping-norm=0.5")
    assert "privacy: client-level (epsilon = " in capsys.readouterr().out
    s = _summary(run_dir)
    expected = client_level_guarantee(0.5, 3, 3, 2, 1e-5)
    assert s["status"] == "finished" and s["client_dp"]["epsilon"] == pytest.approx(expected.epsilon)
    assert s["client_dp"]["statement"] == expected.statement and "dp_epsilon" not in s
    df = pd.read_csv(run_dir / "metrics.csv")
    assert df["dp_epsilon"].isna().all() and np.isfinite(df["train_loss"].iloc[1:]).all()
    assert (df["clients_trained"].iloc[1:] == 3).all()


def _fails_with_one_line(tmp_path: Path, capsys, *args: str) -> str:
    out = tmp_path / "runs"
    assert main(["run", *TINY, "--set", f"output-dir={out}", *args]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedkn: error: ") and not captured.out
    assert not out.exists()  # rejected before any run directory is made
    return lines[0]


@pytest.mark.parametrize("norm", ["bn", "fedbn"])
def test_batchnorm_under_dp_sgd_fails_cleanly_naming_the_alternatives(tmp_path, capsys, norm):
    line = _fails_with_one_line(tmp_path, capsys, "--norm", norm, *DP_SGD)
    assert "BatchNorm" in line and "kn, gn, ln, wsgn, none" in line


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["dp-target-epsilon=0"], "exactly one of dp-noise-multiplier and dp-target-epsilon"),
        (["dp-target-epsilon=-1"], "'dp-target-epsilon' must be 0 (off) or positive"),
        (["dp-target-epsilon=8", "dp-noise-multiplier=1"], "exactly one of dp-noise-multiplier and dp-target-epsilon"),
        (["dp-noise-multiplier=1", "dp-accountant=moments"], "accountant must be one of rdp, prv, gdp"),
        (["dp-noise-multiplier=1", "dp-delta=1"], "delta must be in (0, 1)"),
    ],
)
def test_bad_dp_sgd_settings_exit_2(tmp_path, capsys, sets, fragment):
    args = ["--set", "dp-sgd=true"]
    for s in sets:
        args += ["--set", s]
    assert fragment in _fails_with_one_line(tmp_path, capsys, *args)


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["client-dp=server-fixed", "strategy=fedadam"], "needs strategy fedavg or fedprox"),
        (["client-dp=server-adaptive", "client-dp-noise-multiplier=1"], "count-stddev above 0.5"),
        (["client-dp=central"], "config key 'client-dp' must be one of off"),
    ],
)
def test_bad_client_dp_settings_exit_2(tmp_path, capsys, sets, fragment):
    args = []
    for s in sets:
        args += ["--set", s]
    assert fragment in _fails_with_one_line(tmp_path, capsys, *args)
