"""Smoke test of the performance benchmarks (benchmarks/*.py): each runs with its tiniest --quick
settings and prints its table and ratio lines. No timing assertions (timings on a shared CI box mean
nothing); the numbers come from running the scripts by hand, see benchmarks/README.md.

The scripts run in this process (imported from their files: no interpreter and torch/Flower import
per script); the fedkn runs they start stop their own Ray processes (checked here too).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """benchmarks/<name>.py as module ``name`` (scale.py imports simulation_overhead by that name)."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", "") == str(BENCHMARKS / f"{name}.py"):
        return sys.modules[name]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setattr(sys, "argv", ["benchmark"])
    yield
    import ray

    if ray.is_initialized():  # a failed run must not leave Ray running
        ray.shutdown()


def _own_ray_processes() -> list[str]:
    """Descendants of this process that are Ray's (none may outlive a benchmark)."""
    overhead = _load("simulation_overhead")
    tree = overhead.process_tree(os.getpid())
    names = [overhead._name(pid) for pid in tree if pid != os.getpid()]
    return [n for n in names if "ray" in n.lower() or n in ("gcs_server", "raylet")]


@pytest.mark.parametrize(("grad", "impl"), [("sum", "auto"), ("dense", "reference")])
def test_knconv_quick(capsys, grad, impl):
    assert _load("knconv").main(["--quick", "--grad", grad, "--impl", impl]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("3->64 ", "64->256 ", "256->64 ", "all shapes (sum)"))]
    assert len(rows) == 4 and all(len(line.split()) >= 10 for line in rows)
    assert f"grad={grad} KNConv2d impl={impl}" in out
    assert "whole training step (fwd+bwd, width 0.25): KNResNet-18 " in out and " GFLOP" in out
    assert "per FLOP (KernelNorm's own cost)" in out
    assert "targets: unfold/KN >= 5 -> " in out and "KN/convBN time <= 1.0 (cpu) -> " in out
    assert "bare Conv2d: unfold/conv = " in out


def test_throughput_quick(capsys):
    assert _load("throughput").main(["--quick", "--norms", "kn,bn,none", "--batches", "8,16", "--dataset", "digits"]) == 0
    out = capsys.readouterr().out
    assert "ratio vs bn, batch 8: kn " in out
    for norm in ("kn", "bn", "none"):
        assert any(line.startswith(f"{norm} ") for line in out.splitlines())
    assert "KernelNorm's fused CPU kernels: cold build " in out
    assert "target: kn >= 0.85x bn samples/s at batch 8 and 16 -> " in out


def test_gpu_script_quick_on_cpu():
    """benchmarks/gpu.sh --quick: the same three parts as on a GPU, tiny, on this CPU."""
    import subprocess

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), "--quick"], capture_output=True, text=True,
                          env=env, timeout=600, cwd=BENCHMARKS.parent, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for part in ("== knconv", "== throughput", "== simulation", "targets: unfold/KN >= 5", "ratio vs bn, batch 8",
                 "final test acc"):
        assert part in done.stdout, part


@pytest.mark.slow
def test_simulation_overhead_quick(capsys):
    assert _load("simulation_overhead").main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "time per round, rounds 2..R (s)" in out
    assert "ratio fedkn/loop time per round = " in out
    assert "target: fedkn time per round <= 1.15x plain loop -> " in out
    assert "same work check: final test loss equal on every run (|diff| < 1e-3): yes" in out
    assert _own_ray_processes() == []


@pytest.mark.slow
def test_scale_quick(capsys):
    assert _load("scale").main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "target: peak RSS < 4 GiB -> " in out
    assert "ratio peak RSS 8/4 clients = " in out
    assert "target: flat memory, RSS ratio <= 1.10 -> " in out
    assert _own_ray_processes() == []
