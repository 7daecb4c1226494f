"""End-to-end: the real fedkn app through Flower's deployment engine on 127.0.0.1.

A SuperLink and SuperNodes run as separate processes (free ports, an isolated FLWR_HOME), `flwr run`
submits the app from the repository root exactly as docs/deployment.md says, and the test checks
that the run finished and wrote its metrics. Variants: plain HTTP, TLS with SuperNode
authentication, and a SuperNode killed mid-run (enough nodes left / too few left).

Each test stops every process it started (by pid, bounded waits) in its fixture's teardown.
Timings on a 2-core CI machine: about 1-2 minutes each (every Flower message starts a fresh
ClientApp process, which imports torch).
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import TINY, Deployment, Proc, read_metrics, run_dirs, tails, wait_until

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 240.0  # seconds for one `flwr run --stream` (2 tiny rounds: ~75 s on 2 idle cores)


@pytest.fixture
def deployment_factory(tmp_path: Path) -> Iterator[list[Deployment]]:
    made: list[Deployment] = []
    yield made
    for dep in made:
        dep.procs.stop_all()
        left = dep.procs.still_running()
        assert not left, f"processes still running after teardown: {left}"


def _start(
    made: list[Deployment], root: Path, *, tls: bool = False, auth: bool = False, num_nodes: int = 2,
    node_config: dict[int, dict[str, object]] | None = None,
) -> Deployment:
    dep = Deployment.create(root, tls=tls, auth=auth, num_nodes=num_nodes)
    made.append(dep)
    dep.start_superlink(auth=auth)
    for i in range(num_nodes):
        if auth:
            dep.register(i)
        cfg = {"partition-id": i, "num-partitions": num_nodes, **(node_config or {}).get(i, {})}
        dep.start_supernode(i, cfg, auth=auth)
    dep.wait_nodes_online(num_nodes)
    return dep


def _finished_run(dep: Deployment, output_dir: Path, output: str, status: str = "finished:completed") -> tuple[Path, dict]:
    runs = dep.runs()
    assert len(runs) == 1, runs
    assert runs[0]["status"] == status, f"{runs[0]}\n{output[-4000:]}\n{tails(dep.procs.logs())}"
    dirs = run_dirs(output_dir)
    assert len(dirs) == 1, f"expected one run directory in {output_dir}: {dirs}\n{output[-3000:]}"
    summary = json.loads((dirs[0] / "summary.json").read_text())
    return dirs[0], summary


def _check_two_rounds(run_dir: Path, summary: dict) -> None:
    rows = read_metrics(run_dir)
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert int(r["clients_trained"]) == 2
        assert math.isfinite(float(r["test_loss"])) and 0.0 <= float(r["test_accuracy"]) <= 1.0
        assert math.isfinite(float(r["fed_eval_loss"])) and math.isfinite(float(r["train_loss"]))
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    assert (run_dir / "model.pt").is_file()


def test_loopback_two_rounds(tmp_path: Path, deployment_factory: list[Deployment]) -> None:
    dep = _start(deployment_factory, tmp_path)
    out = tmp_path / "runs"
    result, wall = dep.submit({**TINY, "output-dir": str(out)}, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout[-4000:]
    run_dir, summary = _finished_run(dep, out, result.stdout)
    _check_two_rounds(run_dir, summary)
    print(f"\ndeployment engine, 2 rounds: flwr run {wall:.1f}s wall, server {summary['elapsed_s']:.1f}s")


def test_loopback_tls_with_supernode_auth(tmp_path: Path, deployment_factory: list[Deployment]) -> None:
    dep = _start(deployment_factory, tmp_path, tls=True, auth=True)
    out = tmp_path / "runs"
    result, wall = dep.submit({**TINY, "output-dir": str(out)}, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout[-4000:]
    run_dir, summary = _finished_run(dep, out, result.stdout)
    _check_two_rounds(run_dir, summary)
    assert "https://127.0.0.1" in dep.link.log.read_text()  # type: ignore[union-attr]
    print(f"\ndeployment engine + TLS + auth, 2 rounds: flwr run {wall:.1f}s wall, server {summary['elapsed_s']:.1f}s")


def test_tls_rejects_unregistered_supernode(tmp_path: Path, deployment_factory: list[Deployment]) -> None:
    """With SuperNode authentication on, a SuperNode whose key was not registered cannot join."""
    dep = Deployment.create(tmp_path, tls=True, auth=True, num_nodes=1)
    deployment_factory.append(dep)
    dep.start_superlink(auth=True)
    node = dep.start_supernode(0, {"partition-id": 0, "num-partitions": 1}, auth=True)  # never registered
    wait_until(lambda: node.popen.poll() is not None, 60, "the unregistered SuperNode to give up", logs=[node.log])
    assert node.popen.returncode != 0
    assert dep.online_nodes() == 0


def _kill_after_round(dep: Deployment, out: Path, round_no: int, node: int, run_config: dict) -> tuple[Proc, str, float]:
    """Run `flwr run --stream` in the background; SIGKILL SuperNode `node` (and its ClientApp
    processes: a crashed machine) once round `round_no` is in metrics.csv; wait for the end.
    Returns (the flwr process, its output, seconds from the kill to the end of the run)."""
    proc = dep.submit_background(run_config)

    def round_done() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"the run ended before round {round_no}\n{tails([proc.log])}")
        dirs = run_dirs(out)
        return bool(dirs) and (dirs[0] / "metrics.csv").exists() and any(
            int(r["round"]) == round_no for r in read_metrics(dirs[0])
        )

    wait_until(round_done, RUN_TIMEOUT, f"round {round_no} to finish", logs=dep.procs.logs())
    dep.procs.kill(dep.nodes[node])
    t_kill = time.perf_counter()
    try:
        proc.popen.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        dep.procs.kill(proc)
        raise AssertionError(f"the run hung after SuperNode {node} died\n{tails(dep.procs.logs())}") from None
    return proc, proc.log.read_text(encoding="utf-8", errors="replace"), time.perf_counter() - t_kill


def test_supernode_dies_run_completes(tmp_path: Path, deployment_factory: list[Deployment]) -> None:
    """A SuperNode killed mid-run: the server drops it (after Flower's heartbeat timeout) and goes on."""
    dep = _start(deployment_factory, tmp_path)
    out = tmp_path / "runs"
    proc, log, after = _kill_after_round(dep, out, 0, node=1, run_config={**TINY, "min-clients": 1, "output-dir": str(out)})
    assert proc.popen.returncode == 0, log[-4000:]
    run_dir, summary = _finished_run(dep, out, log)
    rows = read_metrics(run_dir)
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert [int(r["clients_trained"]) for r in rows[1:]] == [1, 1]
    assert summary["status"] == "finished"
    print(f"\nrun finished {after:.1f}s after SuperNode 1 was killed")


def test_too_few_supernodes_run_stops_cleanly(tmp_path: Path, deployment_factory: list[Deployment]) -> None:
    """Below min-clients the run ends with one clear line and the last finished round saved."""
    dep = _start(deployment_factory, tmp_path)
    out = tmp_path / "runs"
    cfg = {**TINY, "num-rounds": 3, "min-clients": 2, "output-dir": str(out)}
    _, log, after = _kill_after_round(dep, out, 1, node=1, run_config=cfg)
    run_dir, summary = _finished_run(dep, out, log, status="finished:failed")
    assert [int(r["round"]) for r in read_metrics(run_dir)] == [0, 1]
    assert summary["status"] == "failed" and summary["rounds_completed"] == 1
    assert "min-clients" in summary["error"], summary["error"]
    assert "min-clients" in log, log[-3000:]
    assert (run_dir / "model.pt").is_file()
    print(f"\nrun stopped {after:.1f}s after SuperNode 1 was killed: {summary['error']}")
