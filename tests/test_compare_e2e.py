"""``fedkn compare`` end to end on tiny settings: a quick grid, resume, rebuild, --only re-run, tuning.

Eight short simulations in all (each starts its own Ray instance): 4 grid cells, 2 re-runs, 2
tuning runs. Tiny: ResNet-8 at width 0.125, 3 clients, 3 local steps, 2 rounds.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedkn.cli import main
from fedkn.compare.grid import RUNS_DIR

pytestmark = pytest.mark.slow

TINY = ["--set", "num-clients=3", "--set", "width=0.125", "--set", "local-steps=3", "--set", "num-rounds=2",
        "--set", "eval-batch-size=512"]
GRID = ["compare", *TINY, "--norms", "kn,gn", "--partitions", "iid", "--seeds", "2"]
#: The columns a re-run must reproduce exactly (the time columns differ by nature).
EXACT = ("round", "test_loss", "test_accuracy", "fed_eval_loss", "fed_eval_accuracy", "train_loss", "train_accuracy",
         "clients_trained", "bytes_sent")


def _metrics(path: Path) -> list[dict[str, str]]:
    with open(path / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "quick"
    assert main([*GRID, "--out", str(out), "--target", "0.3"]) == 0
    return out


def test_quick_grid_writes_runs_report_and_plots(grid_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = sorted(p.name for p in (grid_dir / RUNS_DIR).iterdir())
    assert runs == ["gn_iid_s0", "gn_iid_s1", "kn_iid_s0", "kn_iid_s1"]
    for name in runs:
        summary = json.loads((grid_dir / RUNS_DIR / name / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["rounds_completed"] == 2
        assert [int(r["round"]) for r in _metrics(grid_dir / RUNS_DIR / name)] == [0, 1, 2]
    # same seed -> same partition and client sampling for both norms; different seeds differ
    kn0, gn0, kn1 = (_metrics(grid_dir / RUNS_DIR / n) for n in ("kn_iid_s0", "gn_iid_s0", "kn_iid_s1"))
    assert [r["bytes_sent"] for r in kn0] != [] and kn0[1]["clients_trained"] == gn0[1]["clients_trained"] == "3"
    assert kn0[2]["test_accuracy"] != kn1[2]["test_accuracy"]
    text = (grid_dir / "report.md").read_text()
    assert "## iid" in text and "| **kn** |" in text and "| gn |" in text and "rounds to 30%" in text
    assert "Paired difference" in text and "--norms kn,gn --partitions iid --seeds 2" in text
    assert (grid_dir / "accuracy_test.png").is_file() and (grid_dir / "final_metrics.csv").is_file()

    # a second run of the same command skips every finished cell (no simulation)
    capsys.readouterr()
    assert main([*GRID, "--out", str(grid_dir), "--target", "0.3"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 4 and "0 cells run, 4 already finished" in out


def test_report_rebuild_is_identical(grid_dir: Path) -> None:
    before = (grid_dir / "report.md").read_text()
    csv_before = (grid_dir / "final_metrics.csv").read_text()
    (grid_dir / "report.md").unlink()
    assert main(["report", str(grid_dir)]) == 0
    assert (grid_dir / "report.md").read_text() == before
    assert (grid_dir / "final_metrics.csv").read_text() == csv_before


def test_only_rerun_reproduces_committed_metrics(grid_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rerun"
    assert main([*GRID, "--out", str(out), "--target", "0.3", "--only", "norm=gn,partition=iid,seed=1"]) == 0
    assert sorted(p.name for p in (out / RUNS_DIR).iterdir()) == ["gn_iid_s1"]
    fresh = _metrics(out / RUNS_DIR / "gn_iid_s1")
    committed = _metrics(grid_dir / RUNS_DIR / "gn_iid_s1")
    assert [{k: r[k] for k in EXACT} for r in fresh] == [{k: r[k] for k in EXACT} for r in committed]


def test_eval_every_of_a_partition_changes_the_scored_rounds_not_training(grid_dir: Path, tmp_path: Path) -> None:
    """The grid's kn iid seed-0 cell again, with --eval-every iid=2: the test set is scored at rounds
    0 and 2 only, every training and federated-evaluation figure is the committed one, and the report
    and compare.json record the cadence."""
    from fedkn.results import RunDir

    out = tmp_path / "every"
    assert main([*GRID, "--partitions", "iid,dir0.5", "--eval-every", "iid=2", "--out", str(out), "--target", "0.3",
                 "--only", "norm=kn,partition=iid,seed=0"]) == 0
    assert RunDir(out / RUNS_DIR / "kn_iid_s0").read_config().federation.eval_every == 2
    fresh, committed = _metrics(out / RUNS_DIR / "kn_iid_s0"), _metrics(grid_dir / RUNS_DIR / "kn_iid_s0")
    assert [r["test_accuracy"] != "nan" for r in fresh] == [True, False, True]
    assert [r["test_accuracy"] for r in fresh[::2]] == [r["test_accuracy"] for r in committed[::2]]
    same = [k for k in EXACT if not k.startswith("test_")]
    assert [{k: r[k] for k in same} for r in fresh] == [{k: r[k] for k in same} for r in committed]
    assert json.loads((out / "compare.json").read_text())["eval_every"] == {"iid": 2}
    text = (out / "report.md").read_text()
    assert "eval-every 1 (iid: 2)" in text and "--eval-every iid=2" in text


def test_validation_score_is_the_held_out_federated_score(grid_dir: Path) -> None:
    """Without a val split (val-fraction 0, as in these grid runs), tuning scores the clients'
    held-out local splits, which the federated evaluation also reports: the two must agree."""
    from fedkn.compare.tuning import validation_score

    v = validation_score(grid_dir / RUNS_DIR / "kn_iid_s0")
    last = _metrics(grid_dir / RUNS_DIR / "kn_iid_s0")[-1]
    assert v.source == "clients' held-out local splits" and v.examples > 0 and v.models == 1  # no kept models: the final one
    assert v.accuracy == pytest.approx(float(last["fed_eval_accuracy"]), abs=1e-9)
    assert v.loss == pytest.approx(float(last["fed_eval_loss"]), rel=1e-6)


def test_tuning_scores_the_mean_over_the_models_of_the_last_rounds(tmp_path: Path) -> None:
    """With a window of 2 rounds each tuning run keeps the global models of rounds 1 and 2, and its
    score is the mean of their validation accuracies (checked here with a plain evaluation loop);
    FedBN's runs average too, each client with its BatchNorm state as of the model's round."""
    import contextlib

    import numpy as np

    from fedkn.app import task
    from fedkn.compare.tuning import TuneSpec, load_points, tune, validation_indices
    from fedkn.config import RunConfig
    from fedkn.errors import FedknError
    from fedkn.results import RunDir, load_checkpoint
    from fedkn.train import evaluate

    base = RunConfig.from_sources(None, None, TINY[1::2])
    spec = TuneSpec(grid=(0.05,), rounds=2, seed=0, on="all", max_extensions=0, score_models=2)
    tune(base, [("kn", "iid")], spec, tmp_path)
    with contextlib.suppress(FedknError):  # 2 tiny rounds may leave FedBN near chance: refused after scoring
        tune(base, [("fedbn", "iid")], spec, tmp_path)
    points = {p.norm: p for p in load_points(tmp_path / "tune")}
    assert points["kn"].val_models == points["fedbn"].val_models == 2
    run = RunDir(tmp_path / "tune" / points["kn"].run)
    assert [p.name for p in run.kept_models()] == ["round-1.pt", "round-2.pt"]
    cfg = run.read_config()
    fed, parts, _ = validation_indices(cfg)
    idx = np.sort(np.concatenate(parts))
    accs = []
    for f in run.kept_models():
        model = task.new_model(cfg, fed.train_set)
        model.load_state_dict(load_checkpoint(f).model)
        accs.append(evaluate(model, fed.train_set, idx, 512, "cpu", task.preprocess(cfg, fed.train_set, train=False)).accuracy)
    assert accs[0] != accs[1] and points["kn"].val_accuracy == pytest.approx(float(np.mean(accs)), abs=1e-12)


def test_lr_tuning_picks_best_validation_score_and_flags_edge(tmp_path: Path) -> None:
    from fedkn.compare.grid import expand_grid
    from fedkn.compare.report import build_report, write_meta
    from fedkn.compare.tuning import TuneSpec, load_points, tune
    from fedkn.config import RunConfig

    base = RunConfig.from_sources(None, None, TINY[1::2])
    spec = TuneSpec(grid=(1e-4, 0.05), rounds=1, seed=0, on="all", max_extensions=0)  # extensions: test_compare.py
    choices = tune(base, [("kn", "iid")], spec, tmp_path)
    points = load_points(tmp_path / "tune")
    assert sorted(p.lr for p in points) == [1e-4, 0.05] and all(p.status == "ok" for p in points)
    best = max(points, key=lambda p: (p.val_accuracy, -p.val_loss))
    choice = choices[("kn", "iid")]
    assert choice.lr == best.lr and choice.edge in ("low", "high") and choice.at_edge
    assert all(math.isfinite(p.val_accuracy) and p.val_examples > 0 for p in points)
    assert {p.val_source for p in points} == {"clients' val splits"}  # the default --val-fraction 0.1
    # scored runs are not run again
    again = tune(base, [("kn", "iid")], spec, tmp_path)
    assert again[("kn", "iid")].lr == choice.lr
    # the tuning table shows every grid point's score and flags the edge
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "x").symlink_to(tmp_path / "tune" / points[0].run)
    write_meta(tmp_path, {"norms": ["kn"], "partitions": ["iid"], "tuning": {"grid": [1e-4, 0.05], "rounds": 1, "seed": 0}})
    text = build_report(tmp_path, plots=False).read_text()
    assert "## Learning-rate tuning" in text and "lr 0.0001" in text and "lr 0.05" in text
    assert f"{choice.lr:g} ⚠ {choice.edge} edge" in text
    assert len(expand_grid(["kn"], ["iid"], [0])) == 1


def test_a_diverging_lr_is_recorded_as_diverged_and_tuning_goes_on(tmp_path: Path) -> None:
    from fedkn.compare.tuning import TuneSpec, load_points, tune
    from fedkn.config import RunConfig

    base = RunConfig.from_sources(None, None, TINY[1::2])
    spec = TuneSpec(grid=(0.05, 1e30), rounds=1, seed=0, on="all", max_extensions=0)
    choice = tune(base, [("kn", "iid")], spec, tmp_path)[("kn", "iid")]
    points = {p.lr: p for p in load_points(tmp_path / "tune")}
    assert points[1e30].status == "diverged" and points[0.05].status == "ok"
    # the recorded reason is the client's line, without the run's location appended by the runner
    assert "training diverged" in points[1e30].error and "results so far" not in points[1e30].error
    assert choice.lr == 0.05
