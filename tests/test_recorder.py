"""The run recorder (history, clock, run directory) and the one summary type."""

from __future__ import annotations

import json
import math

from fedkn.config import RunConfig
from fedkn.recorder import RunRecorder
from fedkn.results import RunDir
from fedkn.summary import RunSummary


def _recorder(tmp_path, **kw):
    cfg = RunConfig.of(num_rounds=3, output_dir=str(tmp_path), **kw)
    run_dir = RunDir.create(cfg)
    return cfg, run_dir, RunRecorder(run_dir, cfg, model_parameters=7, device="cpu", centralized=True)


def _round(rec, r, acc, **train):
    return rec.round(r, test=(1.0 - acc, acc), train={"train-loss": 0.5, **train}, evaluate={"eval-accuracy": acc},
                     clients_trained=2, bytes_sent=10)


def test_rounds_land_in_metrics_and_the_summary_tracks_them(tmp_path):
    cfg, run_dir, rec = _recorder(tmp_path)
    seen = []
    rec.progress = lambda row, c: seen.append(row["round"])
    for r, acc in enumerate([0.1, 0.6, 0.4]):
        _round(rec, r, acc)
    assert [r["round"] for r in run_dir.read_metrics()] == [0, 1, 2] and seen == [0, 1, 2]
    running = json.loads(run_dir.summary_path.read_text())
    assert running["status"] == "running" and running["rounds_completed"] == 2
    final = rec.finish("finished")
    on_disk = RunSummary.read(run_dir.path)  # nan (never evaluated) is null there
    assert final.finished and on_disk.finished and on_disk.final_fed_eval_loss is None and math.isnan(final.final_fed_eval_loss)
    assert (final.best_test_accuracy, final.best_round, final.final_test_accuracy) == (0.6, 1, 0.4)
    assert final.total_bytes_sent == 30 and final.model_parameters == 7 and final.config == cfg.to_flower()
    assert "error" not in final.to_json() and "dp_epsilon" not in final.to_json()
    assert run_dir.plot_path.exists()


def test_keep_models_keeps_the_global_model_of_each_of_the_last_rounds(tmp_path):
    import torch

    from fedkn.results import load_checkpoint

    _, run_dir, rec = _recorder(tmp_path, keep_models=2)
    for r in range(4):
        rec.round(r, test=(0.5, 0.5), train={}, evaluate={}, clients_trained=2, bytes_sent=10,
                  checkpoint=({"w": torch.full((1,), float(r))}, {}) if r > 0 else None)
    kept = run_dir.kept_models()
    assert [p.name for p in kept] == ["round-2.pt", "round-3.pt"]  # num-rounds 3: the last 2
    assert [float(load_checkpoint(p).model["w"][0]) for p in kept] == [2.0, 3.0]
    _, plain, rec = _recorder(tmp_path / "plain")
    rec.round(3, test=(0.5, 0.5), train={}, evaluate={}, clients_trained=2, bytes_sent=10, checkpoint=({"w": torch.zeros(1)}, {}))
    assert plain.kept_models() == [] and not plain.models_dir.exists()
    assert RunConfig.of(num_rounds=3, keep_models=5).federation.first_kept_round == 1  # more than the rounds: all


def test_resume_keeps_rows_up_to_the_checkpoint_and_adds_up_elapsed_time(tmp_path):
    cfg, run_dir, rec = _recorder(tmp_path)
    for r in range(3):
        _round(rec, r, 0.5)
    elapsed = run_dir.read_metrics()[1]["elapsed_s"]
    again = RunRecorder(run_dir, cfg, model_parameters=7, device="cpu", centralized=True)
    again.resume(1)
    assert [r["round"] for r in again.history] == [0, 1] and again.elapsed_before == elapsed
    row = _round(again, 2, 0.7)
    assert row["elapsed_s"] >= elapsed and [r["round"] for r in run_dir.read_metrics()] == [0, 1, 2]
    fresh = RunRecorder(run_dir, cfg, model_parameters=7, device="cpu", centralized=True)
    fresh.resume(None)  # no checkpoint: the run starts over
    assert fresh.history == [] and run_dir.read_metrics() == []


def test_dp_sgd_epsilon_is_the_running_maximum_and_extra_fields_join_the_summary(tmp_path):
    cfg, _, rec = _recorder(tmp_path, dp_sgd=True, dp_noise_multiplier=1.0)
    rec.extra = lambda s: {"dp_statement": f"eps {s.dp_epsilon:g} after {s.rounds_completed}"}
    _round(rec, 0, 0.1)
    _round(rec, 1, 0.2, **{"dp-epsilon": 2.0, "dp-epsilon-round": 2.0})
    row = _round(rec, 2, 0.3, **{"dp-epsilon": 1.5, "dp-epsilon-round": 0.4})  # a client that trained less
    assert row["dp_epsilon"] == 2.0 and row["dp_epsilon_round"] == 0.4
    s = rec.finish("failed", "boom")
    assert (s.dp_epsilon, s.dp_delta, s.dp_statement, s.error) == (2.0, cfg.privacy.delta, "eps 2 after 2", "boom")


def test_summary_json_round_trips_and_tolerates_old_or_missing_files(tmp_path):
    s = RunSummary(name="x", status="finished", rounds_completed=3, final_test_accuracy=0.5, note="n")
    d = s.to_json()
    assert "note" in d and "client_dp" not in d and RunSummary.from_json({**d, "future_key": 1}) == s
    assert RunSummary.read(tmp_path / "nowhere").status == "missing"
    (tmp_path / "summary.json").write_text("{not json")
    assert RunSummary.read(tmp_path).status == "missing"
