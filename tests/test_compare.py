"""``fedkn compare`` / ``fedkn report`` without simulations: grid, --only, lr grid, statistics, report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedkn.cli import main
from fedkn.compare.grid import (
    Cell,
    Deadline,
    TimeBudgetSpent,
    cell_config,
    cell_state,
    expand_grid,
    parse_eval_every,
    parse_norms,
    parse_only,
    parse_partitions,
    parse_seeds,
    prepare_dir,
    run_cells,
    select,
    slug,
)
from fedkn.compare.report import (
    RunRecord,
    gain_window,
    headline,
    headline_window,
    mean_std,
    paired_differences,
    read_meta,
    rounds_to_target,
    seconds_to,
    t_interval,
    write_meta,
)
from fedkn.compare.tuning import (
    MAX_EXTENSIONS,
    NEAR_CHANCE_FACTOR,
    TunePoint,
    TuneSpec,
    ValScore,
    check_above_chance,
    choose,
    grid_step,
    parse_lr_grid,
    search,
    tune,
    write_point,
)
from fedkn.config import RunConfig
from fedkn.errors import FedknError
from fedkn.results import RunDir

# --------------------------------------------------------------------------------------------------
# grid and --only
# --------------------------------------------------------------------------------------------------


def test_grid_is_seed_major_and_names_cells() -> None:
    cells = expand_grid(["kn", "gn", "fedbn"], ["iid", "dir0.1"], [0, 1])
    assert len(cells) == 12
    assert cells[:3] == [Cell("kn", "iid", 0), Cell("gn", "iid", 0), Cell("fedbn", "iid", 0)]
    assert {c.seed for c in cells[:6]} == {0}
    assert Cell("kn", "dir0.1", 2).name == "kn_dir0.1_s2"
    assert Cell("gn", "classes-balance:balance=0.5", 0).name == "gn_classes-balance-balance-0.5_s0"
    assert Cell("kn", "iid", 0, 0.05).tune_name() == "kn_iid_lr0.05_s0"
    assert slug("a/b:c") == "a-b-c"


def test_only_filters_cells_and_matches_partition_aliases() -> None:
    cells = expand_grid(["kn", "gn", "bn"], ["iid", "dir0.1"], [0, 1, 2])
    assert select(cells, []) == cells
    assert select(cells, ["norm=kn,partition=dir0.1,seed=0"]) == [Cell("kn", "dir0.1", 0)]
    assert select(cells, ["norm=kn,partition=dirichlet:alpha=0.1,seed=0"]) == [Cell("kn", "dir0.1", 0)]
    assert len(select(cells, ["norm=gn"])) == 6
    union = select(cells, ["norm=kn,seed=1", "norm=bn,seed=2,partition=iid"])
    assert union == [Cell("kn", "iid", 1), Cell("kn", "dir0.1", 1), Cell("bn", "iid", 2)]
    assert parse_only(" norm=kn , seed=3 ") == {"norm": "kn", "seed": "3"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("norm", "key=value"),
        ("lr=0.1", "not one of norm, partition, seed"),
        ("norm=kn,norm=gn", "twice"),
        ("seed=x", "must be an integer"),
        ("partition=bogus", "--only partition"),
        ("", "empty"),
    ],
)
def test_only_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(FedknError, match=message):
        parse_only(spec)


def test_only_matching_no_cell_is_one_clear_error() -> None:
    cells = expand_grid(["kn", "gn"], ["iid"], [0, 1])
    with pytest.raises(FedknError, match=r"--only 'norm=kn,seed=5' matches no cell of the grid \(norms kn,gn; partitions iid; seeds 0,1\)"):
        select(cells, ["norm=kn,seed=5"])
    with pytest.raises(FedknError, match="matches no cell"):
        select(cells, ["norm=kn", "partition=dir0.3"])


def test_grid_option_parsing() -> None:
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("4,1") == [4, 1]
    assert parse_norms("kn,fedbn,none") == ["kn", "fedbn", "none"]
    assert parse_partitions("iid,dir0.1,2cls") == ["iid", "dir0.1", "2cls"]
    for bad, fn in (("0", parse_seeds), ("a", parse_seeds), ("1,1", parse_seeds), ("kn,xx", parse_norms),
                    ("kn,kn", parse_norms), ("dir0.1,dirichlet:alpha=0.1", parse_partitions), ("zz", parse_partitions)):
        with pytest.raises(FedknError):
            fn(bad)


def test_eval_every_maps_grid_partitions_to_their_cadence() -> None:
    parts = ["iid", "dir0.1", "2cls"]
    assert parse_eval_every([], parts) == {}
    assert parse_eval_every(["dir0.1=1", "shards:classes_per_client=2=2"], parts) == {"dir0.1": 1, "2cls": 2}
    assert parse_eval_every(["dirichlet:alpha=0.1=3"], parts) == {"dir0.1": 3}  # the last '=' splits off K


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["1"], r"expects PARTITION=K \(e.g. dir0.1=1\), got '1'; for every partition use --set eval-every=K"),
        (["dir0.1=x"], "K must be a whole number of rounds, got 'x'"),
        (["dir0.1=0"], "K must be at least 1"),
        (["dir0.3=1"], r"'dir0.3' is not one of --partitions \(iid,dir0.1\)"),
        (["zz=1"], "--eval-every zz=1: "),
        (["dir0.1=1", "dirichlet:alpha=0.1=2"], "names partition 'dir0.1' twice"),
    ],
)
def test_eval_every_errors(specs: list[str], message: str) -> None:
    with pytest.raises(FedknError, match=message):
        parse_eval_every(specs, ["iid", "dir0.1"])


def test_cell_config_changes_only_the_cell_keys() -> None:
    base = RunConfig.from_dict({"num-rounds": 3, "width": 0.125, "lr": 0.02})
    kn = cell_config(base, Cell("kn", "dir0.1", 2))
    fedbn = cell_config(base, Cell("fedbn", "dir0.1", 2))
    assert (kn.model.norm, kn.federation.strategy, kn.data.partition, kn.run.seed, kn.train.lr, kn.run.name) == (
        "kn", "fedavg", "dir0.1", 2, 0.02, "kn_dir0.1_s2")
    assert (fedbn.model.norm, fedbn.federation.strategy) == ("bn", "fedbn")
    same = {"norm", "strategy", "name"}
    assert {k: v for k, v in kn.to_flower().items() if k not in same} == {k: v for k, v in fedbn.to_flower().items() if k not in same}
    assert cell_config(base, Cell("gn", "iid", 0, 0.1)).train.lr == 0.1


def test_cell_state_detects_finished_partial_and_foreign_dirs(tmp_path: Path) -> None:
    cfg = cell_config(RunConfig.from_dict({"num-rounds": 2}), Cell("kn", "iid", 0))
    path = tmp_path / "kn_iid_s0"
    assert prepare_dir(path, cfg) == "new"
    assert cell_state(path, cfg) == "partial"
    RunDir(path).write_summary({"status": "finished", "rounds_completed": 2})
    assert cell_state(path, cfg) == "finished"
    assert cell_state(path, cfg.replace(num_rounds=4)) == "partial"  # extending a run resumes it
    with pytest.raises(FedknError, match="holds a run of another config.*lr"):
        cell_state(path, cfg.replace(lr=0.5))
    assert prepare_dir(path, cfg.replace(lr=0.5), force=True) == "new"


# --------------------------------------------------------------------------------------------------
# the lr grid and the choice
# --------------------------------------------------------------------------------------------------


def test_lr_grid_forms() -> None:
    assert parse_lr_grid("0.1, 0.01,0.03") == [0.01, 0.03, 0.1]
    assert parse_lr_grid("log:0.001:0.1:5") == [0.001, 0.00316, 0.01, 0.0316, 0.1]


@pytest.mark.parametrize("text", ["0.1,0", "-0.01", "0.1,-1", "nan", "inf", "abc", "", "log:0:1:3", "log:0.1:0.01:3",
                                  "log:0.1:1", "0.1,0.1", "log:1e-3:-1:4"])
def test_lr_grid_errors(text: str) -> None:
    with pytest.raises(FedknError, match="--lr-grid"):
        parse_lr_grid(text)


def _point(lr: float, acc: float, loss: float = 1.0, status: str = "ok") -> TunePoint:
    return TunePoint("kn", "iid", lr, 0, status, acc, loss, 100, "val", f"kn_iid_lr{lr:g}_s0")


def test_choose_picks_best_validation_score_and_flags_edges() -> None:
    middle = choose([_point(0.001, 0.5), _point(0.01, 0.9), _point(0.1, 0.7)])
    assert (middle.lr, middle.edge, middle.at_edge) == (0.01, "", False)
    high = choose([_point(0.001, 0.5), _point(0.01, 0.6), _point(0.1, 0.7)])
    assert (high.lr, high.edge) == (0.1, "high")
    low = choose([_point(0.001, 0.8), _point(0.01, 0.6), _point(0.1, 0.7)])
    assert (low.lr, low.edge) == (0.001, "low")
    tie = choose([_point(0.001, 0.8, 0.9), _point(0.01, 0.8, 0.4), _point(0.1, 0.1)])
    assert tie.lr == 0.01  # equal accuracy: lower validation loss wins
    diverged = choose([_point(0.001, 0.5), _point(0.01, 0.6), _point(0.1, math.nan, status="diverged")])
    assert (diverged.lr, diverged.edge) == (0.01, "")  # a larger lr was tried (and diverged): not an edge
    with pytest.raises(FedknError, match="every lr of the grid failed"):
        choose([_point(0.1, math.nan, status="diverged")])


def _peaked(peak: float, calls: list[float] | None = None, diverge_above: float = math.inf):
    """A stub scorer: validation accuracy falls off with the log distance from ``peak``."""

    def score(lr: float) -> TunePoint:
        if calls is not None:
            calls.append(lr)
        if lr > diverge_above:
            return _point(lr, math.nan, status="diverged")
        return _point(lr, 0.9 - 0.1 * abs(math.log2(lr / peak)))

    return score


def test_grid_step_is_the_grids_log_spacing() -> None:
    assert grid_step(parse_lr_grid("log:0.005:0.08:5")) == pytest.approx(2.0)
    assert grid_step([0.01, 0.03, 0.1]) == pytest.approx(math.sqrt(10))
    assert grid_step([0.1]) == 2.0


def test_search_extends_the_grid_past_the_edge_until_the_choice_is_inside() -> None:
    calls: list[float] = []
    high = search([0.01, 0.02, 0.04], _peaked(0.16, calls))
    assert high.extended == (0.08, 0.16, 0.32) and calls[3:] == [0.08, 0.16, 0.32]
    assert (high.lr, high.edge, high.capped) == (0.16, "", False)
    assert [p.lr for p in high.points] == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32]
    low = search([0.01, 0.02, 0.04], _peaked(0.0025))
    assert (low.lr, low.extended, low.edge) == (0.0025, (0.005, 0.0025, 0.00125), "")
    inside = search([0.01, 0.02, 0.04], _peaked(0.02))
    assert (inside.lr, inside.extended) == (0.02, ())
    # the spacing of a comma grid, rounded to 3 digits like log grids
    assert search([0.01, 0.1], _peaked(1.0)).extended[0] == 1.0


def test_search_stops_at_a_diverged_lr_a_missing_score_and_the_cap() -> None:
    diverged = search([0.01, 0.02, 0.04], _peaked(1.0, diverge_above=0.1))
    assert (diverged.lr, diverged.extended, diverged.edge) == (0.08, (0.08, 0.16), "")
    scores = {lr: _point(lr, acc) for lr, acc in ((0.01, 0.5), (0.02, 0.6), (0.04, 0.7))}
    pending = search([0.01, 0.02, 0.04], scores.get)  # the next lr (0.08) is not scored: stays flagged
    assert (pending.lr, pending.edge, pending.extended, pending.capped) == (0.04, "high", (), False)
    calls: list[float] = []
    capped = search([0.01, 0.02], _peaked(100.0, calls))
    assert len(capped.extended) == MAX_EXTENSIONS and len(calls) == 2 + MAX_EXTENSIONS
    assert (capped.lr, capped.edge, capped.capped) == (0.32, "high", True)


def test_near_chance_scores_stop_the_tuning_with_one_line() -> None:
    chance = 0.1
    ok = choose([_point(0.01, NEAR_CHANCE_FACTOR * chance + 0.001), _point(0.02, 0.1)])
    check_above_chance({("kn", "iid"): ok}, chance, 15)  # just above the margin: fine
    low = choose([_point(0.01, 0.12), _point(0.02, 0.149)])
    with pytest.raises(FedknError, match=r"below 1.5x chance \(15.0%\) for kn on iid 14.9% at lr 0.02.*--tune-rounds, now 15") as err:
        check_above_chance({("kn", "iid"): ok, ("kn", "dir0.1"): low}, chance, 15)
    assert "\n" not in str(err.value)


def _stub_tuning(monkeypatch: pytest.MonkeyPatch, accuracy) -> list[str]:
    """tune() without simulations: each run writes its config and is scored as ``accuracy(lr)``."""
    from fedkn.compare import grid, tuning

    ran: list[str] = []

    def run_cells(jobs, *, on_done, **_):
        for _what, cell, cfg, path in jobs:
            prepare_dir(path, cfg)
            ran.append(path.name)
            on_done(cell, cfg, path, {}, None)
        return []

    def validation_score(path):
        cfg = RunDir(path).read_config()
        return ValScore(accuracy(cfg.train.lr), 1.0, 100, "clients' val splits", max(1, cfg.federation.keep_models))

    monkeypatch.setattr(grid, "run_cells", run_cells)
    monkeypatch.setattr(tuning, "validation_score", validation_score)
    return ran


def test_tune_runs_the_extensions_reuses_scores_and_redoes_other_lengths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = _stub_tuning(monkeypatch, lambda lr: 0.9 - 0.1 * abs(math.log2(lr / 0.08)))
    base = RunConfig.from_dict({"num-clients": 3, "width": 0.125})
    spec = TuneSpec(grid=(0.01, 0.02, 0.04), rounds=2, seed=0, on="all")
    choice = tune(base, [("kn", "iid")], spec, tmp_path)[("kn", "iid")]
    assert (choice.lr, choice.extended, choice.edge) == (0.08, (0.08, 0.16), "")
    assert ran == [f"kn_iid_lr{v:g}_s0" for v in (0.01, 0.02, 0.04, 0.08, 0.16)]
    ran.clear()
    assert tune(base, [("kn", "iid")], spec, tmp_path)[("kn", "iid")].lr == 0.08 and ran == []  # all reused
    longer = tune(base, [("kn", "iid")], TuneSpec(spec.grid, 3, 0, "all"), tmp_path)[("kn", "iid")]
    assert longer.lr == 0.08 and len(ran) == 5  # planned with 2 rounds: every run again, at 3
    assert RunDir(tmp_path / "tune" / "kn_iid_lr0.16_s0").read_config().federation.num_rounds == 3


def test_tuning_runs_keep_their_last_rounds_models_and_a_group_keeps_its_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = _stub_tuning(monkeypatch, lambda lr: 0.9 - 0.1 * abs(math.log2(lr / 0.02)))
    base = RunConfig.from_dict({"num-clients": 3, "width": 0.125})

    def keep(name: str) -> int:
        return RunDir(tmp_path / "tune" / name).read_config().federation.keep_models

    assert TuneSpec((0.01,), rounds=54, seed=0, on="all").models_scored == 11  # 20% of the rounds
    assert TuneSpec((0.01,), rounds=2, seed=0, on="all").models_scored == 1
    tune(base, [("kn", "iid")], TuneSpec((0.01, 0.02, 0.04), 10, 0, "all", score_models=1), tmp_path)
    assert [keep(n) for n in ran] == [0, 0, 0]  # one model: the final one, nothing extra kept
    ran.clear()
    # kn on iid was scored on its final models: a new lr of that group is too; a new group gets the window
    spec = TuneSpec((0.01, 0.02, 0.04, 0.08), 10, 0, "all", score_models=3)
    choices = tune(base, [("kn", "iid"), ("gn", "iid")], spec, tmp_path)
    assert ran == ["kn_iid_lr0.08_s0", *[f"gn_iid_lr{v:g}_s0" for v in (0.01, 0.02, 0.04, 0.08)]]
    assert keep("kn_iid_lr0.08_s0") == 0 and {keep(n) for n in ran[1:]} == {3}
    assert {p.val_models for p in choices[("gn", "iid")].points} == {3} and {p.val_models for p in choices[("kn", "iid")].points} == {1}


def test_compare_stops_when_tuning_scores_are_near_chance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    ran = _stub_tuning(monkeypatch, lambda lr: 0.12)  # digits: 10 classes, chance 10%
    args = ["compare", "--norms", "kn", "--partitions", "iid", "--seeds", "1", "--set", "num-clients=3",
            "--lr-grid", "0.01,0.02,0.04", "--tune-rounds", "2", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "below 1.5x chance" in err and "--tune-rounds, now 2" in err
    # a flat score ties to the smallest lr, a low edge: the grid was extended 4 times before the refusal
    assert len(ran) == 3 + MAX_EXTENSIONS and ran[-1] == "kn_iid_lr0.000625_s0"
    assert not (tmp_path / "runs").exists()  # no grid cell ran


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------


def test_mean_std_and_rounds_to_target() -> None:
    m, s, n = mean_std([0.5, 0.7, math.nan, None, 0.9])
    assert (n, m) == (3, pytest.approx(0.7)) and s == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    assert math.isnan(mean_std([0.4])[1]) and mean_std([])[2] == 0
    rows = [{"round": 0, "test_accuracy": 0.95}, {"round": 1, "test_accuracy": 0.5},
            {"round": 2, "test_accuracy": math.nan}, {"round": 3, "test_accuracy": 0.81}, {"round": 4, "test_accuracy": 0.9}]
    assert rounds_to_target(rows, 0.8) == 3  # round 0 (the initial model) never counts
    assert rounds_to_target(rows, 0.9) == 4
    assert rounds_to_target(rows, 0.99) is None


@pytest.mark.parametrize("diffs", [[0.01, 0.03, -0.005], [0.1, 0.2], [0.02, 0.02, 0.05, -0.01, 0.0]])
def test_t_interval_matches_scipy(diffs: list[float]) -> None:
    m, lo, hi, n = t_interval(diffs)
    ref = stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert n == len(diffs) and m == pytest.approx(np.mean(diffs))
    assert (lo, hi) == (pytest.approx(ref[0]), pytest.approx(ref[1]))
    m1, lo1, hi1, _ = t_interval([0.3])
    assert m1 == 0.3 and math.isnan(lo1) and math.isnan(hi1)


def test_headline_window_and_gain_window() -> None:
    assert headline_window(30) == (28, 30) and gain_window(30) == (22, 24)  # last 10%; same width ending at 80%
    assert headline_window(200, 5) == (181, 200) and gain_window(200, 5) == (141, 160)
    assert headline_window(30, 5) == (26, 30) and gain_window(30, 5) == (20, 24)  # widened to hold an evaluation
    assert headline_window(3) == (3, 3) and gain_window(3) == (2, 2)
    assert headline_window(1) == (1, 1) and gain_window(1) == (1, 0)  # empty: no gain for a 1-round run


def test_headline_averages_the_last_evaluations_and_counts_them() -> None:
    # 30 rounds evaluated every 5: the window 26-30 holds one evaluation (round 30), 20-24 one (round 20)
    rows = [{"round": r, "test_accuracy": 0.5 + r / 100 if r % 5 == 0 else math.nan} for r in range(31)]
    value, evals, gain = headline(rows, "test_accuracy", 30, 5)
    assert (value, evals, gain) == (pytest.approx(0.8), 1, pytest.approx(0.1))
    # every round: the mean of rounds 28-30 minus the mean of rounds 22-24
    every = [{"round": r, "test_accuracy": a} for r, a in enumerate([0.1] * 22 + [0.70, 0.72, 0.74, 0.7, 0.7, 0.7, 0.80, 0.76, 0.75])]
    value, evals, gain = headline(every, "test_accuracy", 30)
    assert (value, evals, gain) == (pytest.approx(0.77), 3, pytest.approx(0.05))
    flat = [{"round": r, "test_accuracy": 0.9} for r in range(31)]
    assert headline(flat, "test_accuracy", 30)[2] == pytest.approx(0.0)
    assert math.isnan(headline([{"round": 0, "test_accuracy": 0.1}], "test_accuracy", 30)[0])


def test_seconds_to_target_sums_the_round_times_up_to_it() -> None:
    rows = [{"round": 0, "round_time_s": 9.0}, {"round": 1, "round_time_s": 2.5}, {"round": 2, "round_time_s": 1.5},
            {"round": 3, "round_time_s": 4.0}]
    assert seconds_to(rows, 2) == 4.0 and seconds_to(rows, 3) == 8.0  # round 0 (untrained model) left out
    assert seconds_to(rows, None) is None


def _record(norm: str, seed: int, head: float, partition: str = "iid", fed: float | None = None) -> RunRecord:
    rec = RunRecord(norm, partition, seed, 0.01, "finished", [], {}, Path(f"{norm}_{seed}"), 5)
    rec.figures = {"headline_test_accuracy": head, "headline_fed_eval_accuracy": head if fed is None else fed}
    return rec


def test_paired_differences_against_every_other_norm() -> None:
    recs = [
        _record("kn", 0, 0.90, fed=0.91), _record("kn", 1, 0.80, fed=0.82), _record("kn", 2, 0.85, fed=0.86),
        _record("gn", 0, 0.88), _record("gn", 1, 0.81), _record("gn", 2, 0.80),
        _record("none", 0, 0.50), _record("none", 1, 0.55),  # seed 2 missing: paired on seeds 0, 1
        _record("fedbn", 0, math.nan, fed=0.95), _record("fedbn", 1, math.nan, fed=0.94), _record("fedbn", 2, math.nan, fed=0.96),
        _record("kn", 0, 0.10, partition="dir0.1"),
    ]
    pds = {pd.other: pd for pd in paired_differences(recs, "iid")}
    assert list(pds) == ["gn", "none", "fedbn"]
    gn = pds["gn"]
    assert gn.metric == "headline_test_accuracy" and gn.seeds == [0, 1, 2] and gn.diffs == pytest.approx([0.02, -0.01, 0.05])
    ref = stats.t.interval(0.95, 2, loc=np.mean(gn.diffs), scale=stats.sem(gn.diffs))
    assert (gn.low, gn.high) == (pytest.approx(ref[0]), pytest.approx(ref[1]))
    assert pds["none"].seeds == [0, 1] and pds["none"].diffs == pytest.approx([0.40, 0.25])
    fedbn = pds["fedbn"]  # no test figure: both on the clients' headline
    assert fedbn.metric == "headline_fed_eval_accuracy" and fedbn.diffs == pytest.approx([-0.04, -0.12, -0.10])
    assert paired_differences(recs, "dir0.1") == []  # no other norm there


# --------------------------------------------------------------------------------------------------
# report rebuilt from run directories (synthetic metrics)
# --------------------------------------------------------------------------------------------------


def _fake_run(root: Path, norm: str, seed: int, accs: list[float], *, partition: str = "iid", status: str = "finished",
              dp_epsilon: float | None = None, round_time: float = 2.0, device: str = "cpu (AVX2)") -> Path:
    base = RunConfig.from_dict({"num-rounds": len(accs) - 1, "width": 0.125, "num-clients": 3})
    cfg = cell_config(base, Cell(norm, partition, seed), output_dir=root / "runs")
    path = root / "runs" / Cell(norm, partition, seed).name
    prepare_dir(path, cfg)
    run = RunDir(path)
    fedbn = norm == "fedbn"
    for r, a in enumerate(accs):
        run.append_metrics({
            "round": r, "test_loss": math.nan if fedbn else 2 - a, "test_accuracy": math.nan if fedbn else a,
            "fed_eval_loss": 2 - a, "fed_eval_accuracy": a, "train_loss": 1.0, "train_accuracy": a,
            "clients_trained": 3 if r else 0, "bytes_sent": 1_000_000 if r else 0, "round_time_s": round_time,
            "elapsed_s": round_time * r,
        })
    summary = {"status": status, "rounds_completed": len(accs) - 1, "model_parameters": 1234, "device": device}
    if dp_epsilon is not None:
        summary.update(dp_epsilon=dp_epsilon, dp_delta=1e-5)
    run.write_summary(summary)
    return path


def test_report_rebuilds_tables_csv_plots_and_tuning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    curves = {
        "kn": ([0.1, 0.6, 0.85, 0.9], [0.1, 0.5, 0.8, 0.88]),
        "gn": ([0.1, 0.5, 0.7, 0.86], [0.1, 0.4, 0.6, 0.84]),
        "fedbn": ([0.1, 0.7, 0.9, 0.95], [0.1, 0.6, 0.9, 0.93]),
    }
    for norm, per_seed in curves.items():
        for seed, accs in enumerate(per_seed):
            _fake_run(tmp_path, norm, seed, accs, device="cuda (H100)" if (norm, seed) == ("kn", 1) else "cpu (AVX2)")
    _fake_run(tmp_path, "gn", 2, [0.1, 0.2], status="running")  # unfinished: listed, not tabled
    write_meta(tmp_path, {"command": "fedkn compare --norms kn,gn,fedbn", "norms": ["kn", "gn", "fedbn"],
                          "partitions": ["iid"], "seeds": [0, 1], "target": 0.8,
                          "tuning": {"grid": [0.01, 0.1], "rounds": 1, "seed": 0, "on": "all"}})
    for lr, acc in ((0.01, 0.4), (0.1, 0.6)):
        d = tmp_path / "tune" / f"kn_iid_lr{lr:g}_s0"
        d.mkdir(parents=True)
        write_point(d, TunePoint("kn", "iid", lr, 0, "ok", acc, 1.0, 50, "clients' val splits", d.name))

    assert main(["report", str(tmp_path)]) == 0
    assert "report.md" in capsys.readouterr().out
    text = (tmp_path / "report.md").read_text()
    assert "fedkn compare --norms kn,gn,fedbn" in text
    assert "ran on cpu (AVX2) (5), cuda (H100) (1)" in text  # which device each run's numbers come from
    kn_row = next(line for line in text.splitlines() if line.startswith("| **kn**"))
    # 3 rounds: headline window = round 3 (0.9/0.88 -> 89.0 ± 1.4), gain over round 2: +5 and +8 -> +6.5;
    # rounds to 80%: 2 and 2 -> 2.0, i.e. 2 rounds of 2 s -> 4 s
    assert kn_row.startswith("| **kn** | 0.01 | 89.0 ± 1.4 | +6.5 ↑ | 89.0 ± 1.4 | 89.0 ± 1.4 | 2.0 | 4 |")
    assert "1,234" in kn_row and "1.00" in kn_row
    fedbn_row = next(line for line in text.splitlines() if line.startswith("| fedbn"))
    assert "| 94.0 ± 1.4 † | +4.0 ↑ | n/a | n/a | n/a | n/a |" in fedbn_row  # the clients' headline
    gn_row = next(line for line in text.splitlines() if line.startswith("| gn"))
    assert "85.0 ± 1.4" in gn_row and "| 2 |" in gn_row.replace(" ", " ")  # 2 finished seeds only
    assert "| iid | gn | headline test acc | +4.0 |" in text  # kn - gn, paired per seed
    assert "| iid | fedbn | clients' headline acc | -5.0 |" in text
    assert "Headline window: round 3 (" in text and "mean over round 2 (" in text
    assert "⚠ In 6 of 6 runs the headline window holds fewer than 3 evaluations (1)" in text
    assert "not converged: iid: kn (+6.5), gn (+20.0), fedbn (+4.0)." in text
    assert "gn_iid_s2: running" in text
    assert "lr 0.01" in text and "**60.0 (1.000)**" in text and "0.1 ⚠ high edge" in text
    for png in ("accuracy_test.png", "accuracy_clients.png", "accuracy_test_seconds.png", "accuracy_clients_seconds.png",
                "tuning.png"):
        assert (tmp_path / png).stat().st_size > 5000 and f"({png})" in text
    with open(tmp_path / "final_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["norm"], r["seed"], r["status"]) for r in rows][:3] == [("kn", "0", "finished"), ("kn", "1", "finished"), ("gn", "0", "finished")]
    assert len(rows) == 7 and float(rows[0]["final_test_accuracy"]) == 0.9 and rows[0]["rounds_to_target"] == "2"
    assert (rows[0]["headline_accuracy"], rows[0]["headline_metric"], rows[0]["headline_rounds"], rows[0]["headline_evals"]) \
        == ("0.9", "test_accuracy", "3-3", "1")
    assert float(rows[0]["gain_last20"]) == pytest.approx(0.05) and rows[0]["seconds_to_target"] == "4.0"
    fedbn = next(r for r in rows if r["norm"] == "fedbn")
    assert fedbn["headline_metric"] == "fed_eval_accuracy" and float(fedbn["headline_accuracy"]) == 0.95
    tuning = json.loads((tmp_path / "tuning.json").read_text())
    assert tuning["groups"][0]["lr"] == 0.1 and tuning["groups"][0]["edge"] == "high"

    first = text
    assert main(["report", str(tmp_path), "--no-plots", "--target", "0.9"]) == 0
    again = (tmp_path / "report.md").read_text()
    assert "rounds to 90%" in again and again != first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "--lr-grid", "0.1,0", "--dry-run"], "--lr-grid values must be positive"),
        (["compare", "--lr-grid", "-0.5", "--dry-run"], "--lr-grid values must be positive"),
        (["compare", "--only", "norm=kn,seed=7", "--dry-run"], "matches no cell of the grid"),
        (["compare", "--only", "width=2", "--dry-run"], "not one of norm, partition, seed"),
        (["compare", "--norms", "kn,xn", "--dry-run"], "unknown norm 'xn'"),
        (["compare", "--tune-rounds", "2", "--dry-run"], "only apply with --lr-grid"),
        (["compare", "--lr-grid", "0.1,0.2", "--val-fraction", "1", "--dry-run"], "--val-fraction must be in [0, 1)"),
        (["compare", "--target", "1.5", "--dry-run"], "--target"),
        (["compare", "--partitions", "iid", "--eval-every", "dir0.1=1", "--dry-run"], "is not one of --partitions (iid)"),
        (["compare", "--set", "batch-size=1", "--norms", "kn,bn", "--dry-run"], "batch-size 1"),
        (["report", "/nonexistent/dir"], "does not exist"),
    ],
)
def test_bad_inputs_give_one_line_and_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedkn: error:") and message in err


def test_report_on_a_directory_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_report_with_no_finished_run_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fake_run(tmp_path, "kn", 0, [0.1, 0.5], status="partial")
    _fake_run(tmp_path, "gn", 0, [0.1, 0.4], status="diverged")
    assert main(["report", str(tmp_path), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no finished run" in err and "nothing to report" in err
    assert not (tmp_path / "report.md").exists()


def test_dry_run_lists_cells_and_tuning(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["compare", "--norms", "kn,gn", "--partitions", "iid,dir0.1", "--seeds", "2", "--lr-grid", "log:0.01:0.1:3",
            "--tune-on", "dirichlet:alpha=0.1", "--only", "seed=1", "--out", str(tmp_path / "x"), "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "8 cells, running 4 (--only)" in out
    assert "tune kn on dir0.1: lr 0.01, 0.0316, 0.1" in out and "tune gn on dir0.1" in out
    cells = [line for line in out.splitlines() if line.strip().startswith("cell ")]
    assert len(cells) == 4 and all("seed 1" in c for c in cells) and "cell kn iid seed 1" in out
    assert not (tmp_path / "x").exists()
    # --eval-every gives one partition's cells their own test-set cadence; the others keep the base one
    assert main([*args, "--eval-every", "dir0.1=1"]) == 0
    cells = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("cell ")]
    assert [("(eval-every 1)" in c, "dir0.1" in c) for c in cells] == [(False, False), (False, False), (True, True), (True, True)]


def test_help_documents_the_grid(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    for word in ("--norms", "--partitions", "--seeds", "--only", "--lr-grid", "client-num-gpus=0.25", "report.md",
                 "validation split", "resumes"):
        assert word in text


def test_report_has_an_epsilon_column_for_dp_runs(tmp_path: Path) -> None:
    """DP cells show their epsilon (max over seeds) so norms are compared at equal privacy."""
    for seed, eps in enumerate((7.9, 7.998)):
        _fake_run(tmp_path, "kn", seed, [0.1, 0.5], dp_epsilon=eps)
    _fake_run(tmp_path, "gn", 0, [0.1, 0.4])  # non-private cell in the same grid
    assert main(["report", str(tmp_path)]) == 0
    lines = (tmp_path / "report.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| norm |"))
    assert header.rstrip().endswith("| ε |")
    assert next(line for line in lines if line.startswith("| **kn**")).rstrip().endswith("| 8.00 |")
    assert "∞ (non-private)" in next(line for line in lines if line.startswith("| gn"))
    tidy = (tmp_path / "final_metrics.csv").read_text().splitlines()
    assert tidy[0].split(",")[4] == "dp_epsilon"


def test_report_of_private_free_runs_has_no_epsilon_column(tmp_path: Path) -> None:
    _fake_run(tmp_path, "kn", 0, [0.1, 0.5])
    assert main(["report", str(tmp_path)]) == 0
    header = next(line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| norm |"))
    assert "ε" not in header


def test_tuning_edges_are_those_of_the_lrs_each_norm_tried(tmp_path: Path) -> None:
    """A norm added later with a wider grid must not hide that an earlier norm's choice is at its grid's edge."""
    _fake_run(tmp_path, "kn", 0, [0.1, 0.5])
    tried = {"kn": {0.01: 0.5, 0.1: 0.7}, "nf": {0.001: 0.3, 0.01: 0.4, 0.1: 0.8, 1.0: 0.6}}
    for norm, scores in tried.items():
        for lr, acc in scores.items():
            d = tmp_path / "tune" / f"{norm}_iid_lr{lr:g}_s0"
            d.mkdir(parents=True)
            write_point(d, TunePoint(norm, "iid", lr, 0, "ok", acc, 1.0, 50, "clients' val splits", d.name))
    write_meta(tmp_path, {"norms": ["kn", "nf"], "partitions": ["iid"], "seeds": [0],
                          "tuning": {"grid": [0.001, 0.01, 0.1, 1.0], "rounds": 1, "seed": 0, "on": "all"}})
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    groups = {g["norm"]: g for g in json.loads((tmp_path / "tuning.json").read_text())["groups"]}
    assert (groups["kn"]["lr"], groups["kn"]["edge"]) == (0.1, "high")  # 0.1 is the top of what kn tried
    assert (groups["nf"]["lr"], groups["nf"]["edge"]) == (0.1, "")


def test_report_ranks_by_headline_and_converged_cells_are_not_flagged(tmp_path: Path) -> None:
    """A noisy last round does not decide the order; flat curves are not flagged as still gaining."""
    noisy = [0.1] + [0.8] * 27 + [0.9, 0.9, 0.6]  # 30 rounds: last round 60%, headline mean(0.9, 0.9, 0.6) = 80%
    steady = [0.1] + [0.78] * 30
    _fake_run(tmp_path, "bn", 0, noisy)
    _fake_run(tmp_path, "gn", 0, steady, round_time=4.0)
    assert main(["report", str(tmp_path), "--no-plots", "--target", "0.75"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "headline test acc: bn 80.0 > gn 78.0" in text  # the last round alone would put gn first
    assert "No cell gains more than 1 point" in text and "fewer than 3 evaluations" not in text
    gn_row = next(line for line in text.splitlines() if line.startswith("| gn"))
    assert "| 78.0 | +0.0 |" in gn_row and "| 1 | 4 |" in gn_row  # 1 round of 4 s to 75%


def test_report_of_an_unfinished_grid_says_partial_at_its_top(tmp_path: Path) -> None:
    _fake_run(tmp_path, "kn", 0, [0.1, 0.5, 0.6])
    write_meta(tmp_path, {"command": "fedkn compare --norms kn,gn", "norms": ["kn", "gn"], "partitions": ["iid"],
                          "seeds": [0], "target": 0.5})
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    head = (tmp_path / "report.md").read_text().split("Produced by:")[0]
    assert "**Partial**: 1 of the 2 cells of the command below have finished" in head
    _fake_run(tmp_path, "gn", 0, [0.1, 0.4, 0.5])
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    assert "Partial" not in (tmp_path / "report.md").read_text()


def test_a_spent_deadline_starts_no_run_and_leaves_finished_ones(tmp_path: Path) -> None:
    done = _fake_run(tmp_path, "kn", 0, [0.1, 0.5, 0.6])
    base = RunConfig.from_dict({"num-rounds": 2, "width": 0.125, "num-clients": 3})
    jobs = [("cell", c, cell_config(base, c, output_dir=tmp_path / "runs"), tmp_path / "runs" / c.name)
            for c in (Cell("kn", "iid", 0), Cell("gn", "iid", 0))]
    with pytest.raises(TimeBudgetSpent, match=r"1 run\(s\) not started"):
        run_cells(jobs, deadline=Deadline(1e-9))  # the finished kn cell is skipped, gn is never started
    assert done.is_dir() and not (tmp_path / "runs" / "gn_iid_s0").exists()


def test_stop_after_ends_the_command_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid"
    args = ["compare", "--norms", "kn", "--partitions", "iid", "--seeds", "1", "--set", "num-rounds=1", "--out", str(out)]
    assert main([*args, "--stop-after", "0"]) == 2
    assert "--stop-after must be a positive number of minutes" in capsys.readouterr().err
    assert main([*args, "--stop-after", "1e-9"]) == 0
    said = capsys.readouterr().out
    assert "stopped: --stop-after 1e-09 minutes reached, 1 run(s) not started; rerun the same command" in said
    assert not (out / "runs").exists()


def _tune_point(root: Path, norm: str, lr: float, acc: float, models: int = 1) -> None:
    cell = Cell(norm, "iid", 0, lr)
    cfg = cell_config(RunConfig.from_dict({"num-rounds": 2, "num-clients": 3}), cell, name=cell.tune_name())
    path = root / "tune" / cell.tune_name()
    prepare_dir(path, cfg)
    RunDir(path).write_summary({"status": "finished", "rounds_completed": 2, "elapsed_s": 30.0})
    write_point(path, TunePoint(norm, "iid", lr, 0, "ok", acc, 1.0, 50, "clients' val splits", path.name, val_models=models))


def test_report_tuning_shows_extensions_near_chance_and_cost(tmp_path: Path) -> None:
    _fake_run(tmp_path, "kn", 0, [0.1, 0.5])
    for lr, acc in ((0.01, 0.5), (0.02, 0.6), (0.04, 0.7), (0.08, 0.8), (0.16, 0.75)):  # 0.08, 0.16: extensions
        _tune_point(tmp_path, "kn", lr, acc, models=2)
    for lr, acc in ((0.01, 0.12), (0.02, 0.14), (0.04, 0.11)):  # digits: chance 10%, margin 15%
        _tune_point(tmp_path, "none", lr, acc)
    write_meta(tmp_path, {"norms": ["kn", "none"], "partitions": ["iid"], "seeds": [0],
                          "tuning": {"grid": [0.01, 0.02, 0.04], "rounds": 2, "seed": 0, "on": "all"}})
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "| norm | partition | lr 0.01 | lr 0.02 | lr 0.04 | lr 0.08 | lr 0.16 | models averaged | chosen lr |" in text
    assert "| **80.0 (1.000)** | 75.0 (1.000) | 2 | 0.08 (grid extended to 0.08, 0.16) |" in text
    assert "| none | iid | 12.0 (1.000) | **14.0 (1.000)** | 11.0 (1.000) | — | — | 1 | 0.02 ⚠ near chance: unusable |" in text
    assert "**Cost**: 8 tuning runs of 2 rounds each, 4m00s of wall time in all" in text
    groups = {g["norm"]: g for g in json.loads((tmp_path / "tuning.json").read_text())["groups"]}
    assert groups["kn"]["extended"] == [0.08, 0.16] and not groups["kn"]["near_chance"] and groups["none"]["near_chance"]


def test_a_note_in_compare_json_heads_the_report_and_survives_a_rerun(tmp_path: Path) -> None:
    _fake_run(tmp_path, "kn", 0, [0.1, 0.5])
    write_meta(tmp_path, {"norms": ["kn"], "note": "**Early-training snapshot**: about 0.8 epoch."})
    write_meta(tmp_path, {"norms": ["kn"], "partitions": ["iid"]})  # what fedkn compare writes: no note
    assert read_meta(tmp_path)["note"] == "**Early-training snapshot**: about 0.8 epoch."
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[:3] == ["# Normalization comparison", "", "> **Early-training snapshot**: about 0.8 epoch."]
