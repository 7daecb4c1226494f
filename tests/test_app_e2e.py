"""End to end: `fedkn run` on Flower's simulation engine (Ray), 3 clients, tiny models; and the
run directory it writes (fast tests at the end).

Each test starts and stops its own Ray instance (Flower's Ray backend shuts Ray down at the end of
a simulation; the fixture makes sure of it even when a test fails).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedkn.cli import main
from fedkn.results import METRIC_COLUMNS, TIME_COLUMNS, load_checkpoint

TINY = ["--set", "num-clients=3", "--set", "width=0.125", "--set", "batch-size=8", "--set", "local-steps=10",
        "--set", "client-num-cpus=1", "--set", "round-timeout=120"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    yield
    import ray

    if ray.is_initialized():  # a failed test must not leave Ray running
        ray.shutdown()


def _run(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "runs"
    code = main(["run", *TINY, "--set", f"output-dir={out}", *args])
    assert code == 0
    dirs = sorted(out.iterdir())
    return dirs[-1]


def _metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


@pytest.mark.slow
@pytest.mark.parametrize(("norm", "rounds", "eval_every"), [("kn", 1, 1), ("gn", 3, 2)])
def test_end_to_end(tmp_path, capsys, norm, rounds, eval_every):
    """One short run per norm; the gn one also checks eval-every (test set scored at rounds 0, 2, 3)."""
    run_dir = _run(tmp_path, "--norm", norm, "--set", f"num-rounds={rounds}", "--set", f"eval-every={eval_every}",
                   "--set", f"name=e2e-{norm}")
    out = capsys.readouterr().out
    assert f"round   {rounds}/{rounds}  test acc" in out and f"done: {rounds} rounds" in out
    assert {p.name for p in run_dir.iterdir()} >= {"config.toml", "metrics.csv", "summary.json", "metrics.png", "model.pt"}
    df = _metrics(run_dir)
    assert list(df.columns) == list(METRIC_COLUMNS)
    assert list(df["round"]) == list(range(rounds + 1))
    scored = [r for r in range(rounds + 1) if r % eval_every == 0 or r == rounds]
    assert list(df["round"][df["test_accuracy"].notna()]) == scored
    assert df["fed_eval_accuracy"].iloc[1:].notna().all()  # federated evaluation runs every round
    last = df.iloc[-1]
    assert 0.0 <= last["test_accuracy"] <= 1.0 and math.isfinite(last["test_loss"])
    assert math.isfinite(last["fed_eval_accuracy"]) and math.isfinite(last["train_loss"])
    assert last["clients_trained"] == 3 and last["bytes_sent"] > 0
    ckpt = load_checkpoint(run_dir / "model.pt")
    assert ckpt.round == rounds and all(isinstance(v, torch.Tensor) for v in ckpt.model.values())
    summary = pd.read_json(run_dir / "summary.json", typ="series")
    assert summary["status"] == "finished" and summary["norm"] == norm and summary["rounds_completed"] == rounds


@pytest.mark.slow
def test_fedbn_keeps_batchnorm_local_and_resume_matches_uninterrupted_run(tmp_path, capsys):
    common = ["--norm", "fedbn", "--set", "fraction-train=0.67"]  # 2 of 3 clients train each round
    full = _run(tmp_path, *common, "--set", "num-rounds=2", "--set", "name=full")

    # FedBN: the server's model keeps its initial BatchNorm state; each client has its own.
    from fedkn.app import task
    from fedkn.config import RunConfig
    from fedkn.nn.batchnorm import batchnorm_keys

    cfg = RunConfig.from_sources(sets=[s for s in TINY if s != "--set"] + ["norm=fedbn"])
    init = task.new_model(cfg, task.federation(cfg).train_set).state_dict()
    bn = batchnorm_keys(task.new_model(cfg, task.federation(cfg).train_set))
    final = load_checkpoint(full / "model.pt").model
    for k in bn:
        assert torch.equal(final[k], init[k]), f"global {k} must not change under FedBN"
    assert any(not torch.equal(final[k], init[k]) for k in final if k not in bn)
    states = {}
    for f in sorted((full / "client_state").glob("partition-*.pt")):
        pid = int(f.name.split(".")[0].split("-")[1])
        states[pid] = torch.load(f, weights_only=True)  # newest file per client wins (sorted by round)
    assert len(states) >= 2 and all(set(s) == set(bn) for s in states.values())
    means = [k for k in bn if k.endswith("running_mean")]
    a, b = list(states.values())[:2]
    assert not torch.equal(a[means[0]], init[means[0]])  # trained locally
    assert any(not torch.equal(a[k], b[k]) for k in means)  # and differently on each client
    df_full = _metrics(full)
    assert df_full["test_accuracy"].isna().all()  # no centralized eval of a BN-less global model
    assert df_full["fed_eval_accuracy"].iloc[1:].notna().all()
    assert (df_full["clients_trained"].iloc[1:] == 2).all()

    # Interrupted after round 1, then resumed to round 2: same metrics and model as uninterrupted.
    # (Round 1 of `part` is a separate run of the same seed, so this also checks determinism.)
    part = _run(tmp_path, *common, "--set", "num-rounds=1", "--set", "name=part")
    capsys.readouterr()
    assert main(["run", "--resume", str(part), "--set", "num-rounds=2"]) == 0
    out = capsys.readouterr().out
    assert "resuming after round 1" in out and "round   2/2" in out and "round   1/2" not in out
    pd.testing.assert_frame_equal(
        df_full.drop(columns=list(TIME_COLUMNS)), _metrics(part).drop(columns=list(TIME_COLUMNS))
    )
    resumed = load_checkpoint(part / "model.pt")
    assert resumed.round == 2
    for k, v in final.items():
        assert torch.equal(v, resumed.model[k]), k
    # Resuming a finished run does nothing; changing the experiment is refused.
    assert main(["run", "--resume", str(part)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["run", "--resume", str(part), "--set", "lr=0.5"]) == 2
    assert "cannot change lr when resuming" in capsys.readouterr().err


@pytest.mark.slow
def test_client_failure_is_one_line_and_keeps_results(tmp_path, capfd):
    out = tmp_path / "runs"
    code = main(["run", *TINY, "--set", f"output-dir={out}", "--norm", "none", "--set", "lr=1e9",
                 "--set", "num-rounds=2", "--set", "name=boom"])
    captured = capfd.readouterr()
    assert code == 2
    err_lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and err_lines[0].startswith("fedkn: error: client ")
    assert "training diverged" in err_lines[0] and "Traceback" not in captured.err + captured.out
    run_dir = next(out.iterdir())
    df = _metrics(run_dir)
    assert list(df["round"]) == [0]  # the initial evaluation survived the failure
    summary = pd.read_json(run_dir / "summary.json", typ="series")
    assert summary["status"] == "failed" and "training diverged" in summary["error"]
    assert (run_dir / "error.log").exists()


def test_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    from fedkn.config import RunConfig
    from fedkn.results import RunDir

    run = RunDir.create(RunConfig.of(output_dir=str(tmp_path)))
    run.checkpoint_path.write_bytes(b"not a checkpoint")
    assert main(["run", "--resume", str(run.path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedkn: error: checkpoint") and "corrupt" in err and "\n" not in err
    np.testing.assert_equal(len(err.splitlines()), 1)


def test_metrics_are_appended_per_round_and_truncated_on_resume(tmp_path):
    from fedkn.config import RunConfig
    from fedkn.results import RunDir

    run = RunDir.create(RunConfig.of(output_dir=str(tmp_path), name="r"))
    assert run.path.name.endswith("-r") and run.read_config() == RunConfig.of(output_dir=str(tmp_path), name="r")
    for r in range(3):
        run.append_metrics({"round": r, "test_accuracy": 0.1 * r, "bytes_sent": 10 * r})
        assert len(pd.read_csv(run.metrics_path)) == r + 1  # on disk as soon as the round ends
    kept = run.truncate_metrics(1)
    assert [row["round"] for row in kept] == [0, 1]
    df = pd.read_csv(run.metrics_path)
    assert list(df["round"]) == [0, 1] and math.isnan(df["test_loss"][0])
    assert run.plot() is not None and run.plot_path.stat().st_size > 0
    with pytest.raises(ValueError):
        run.append_metrics({"bogus": 1})


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    from fedkn.errors import FedknError
    from fedkn.results import save_checkpoint

    state = {"w": torch.randn(3, 2), "n": torch.tensor(5)}
    save_checkpoint(tmp_path / "m.pt", 4, state, {"m_t.w": torch.ones(3)})
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt.round == 4 and torch.equal(ckpt.model["w"], state["w"]) and "m_t.w" in ckpt.strategy
    torch.save({"format": "other"}, tmp_path / "x.pt")
    for bad in (tmp_path / "x.pt", tmp_path / "missing.pt"):
        with pytest.raises(FedknError):
            load_checkpoint(bad)


def test_client_state_keeps_the_two_newest_per_client(tmp_path):
    from fedkn.results import load_client_state, save_client_state

    for r in (1, 3, 6):
        save_client_state(tmp_path, 0, r, {"bn.running_mean": torch.full((2,), float(r))})
    save_client_state(tmp_path, 1, 2, {"bn.running_mean": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.glob("partition-0.*")) == ["partition-0.round-3.pt", "partition-0.round-6.pt"]
    assert float(load_client_state(tmp_path, 0, 5)["bn.running_mean"][0]) == 3.0  # resume after round 5
    assert float(load_client_state(tmp_path, 0, 6)["bn.running_mean"][0]) == 6.0
    assert load_client_state(tmp_path, 0, 2) is None and load_client_state(tmp_path, 2, 9) is None


def test_client_state_from_keep_from_on_stays_with_the_newest_before_it(tmp_path):
    """keep-models scores the global model of rounds 7..10 with each client's state as of that
    round: a client that trained in rounds 2, 5, 8, 9 and 10 must keep rounds 5 (for rounds 7), 8 and 9."""
    from fedkn.results import load_client_state, save_client_state

    for r in (2, 5, 8, 9, 10):
        save_client_state(tmp_path, 0, r, {"bn.running_mean": torch.full((2,), float(r))}, keep_from=7)
    assert sorted(int(p.name.split("round-")[1][:-3]) for p in tmp_path.glob("partition-0.*")) == [5, 8, 9, 10]
    assert [float(load_client_state(tmp_path, 0, r)["bn.running_mean"][0]) for r in (7, 8, 9, 10)] == [5.0, 8.0, 9.0, 10.0]
