"""`fedkn run --ray-address`: the simulation engine attaches to an existing Ray cluster.

A one-machine cluster is started the way docs/deployment.md says (`ray start --head`), but with
every port chosen at runtime and a private temp dir, so it cannot collide with, or be picked up by,
any other Ray instance on the machine (plain `ray.init()` looks in /tmp/ray for a cluster to join).
`ray stop` is never used: it stops *every* Ray process of the user. The head runs with `--block`
in its own session and is stopped by pid like every other process of the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import BIN, QUIET_ENV, TINY, Processes, free_ports, read_metrics, run_dirs, tails, wait_until

pytestmark = pytest.mark.slow


def _ray_address_supported() -> bool:
    from fedkn.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # argparse has no public API for it
    run = sub.choices.get("run")  # type: ignore[union-attr]
    return run is not None and any("--ray-address" in a.option_strings for a in run._actions)


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[tuple[str, Path, Processes]]:
    # Ray puts Unix sockets under the temp dir; a pytest tmp_path is too long for them (107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="fkray", dir="/tmp"))
    env = {**os.environ, **QUIET_ENV}
    procs = Processes(tmp_path, env)
    gcs, client, agent, dashboard = free_ports(4)
    try:
        head = procs.start(
            "ray-head",
            [
                str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                "--port", str(gcs), "--ray-client-server-port", str(client),
                "--dashboard-agent-listen-port", str(agent), "--dashboard-port", str(dashboard),
                "--include-dashboard=false", "--min-worker-port", "0", "--max-worker-port", "0",
                "--num-cpus", "2", "--temp-dir", str(temp_dir), "--disable-usage-stats",
            ],
        )

        def started() -> bool:
            if head.popen.poll() is not None:
                raise AssertionError(f"`ray start --head` exited with {head.popen.returncode}\n{tails([head.log])}")
            return "Ray runtime started" in head.log.read_text(errors="replace")

        wait_until(started, 90, "the Ray head node", logs=[head.log])
        yield f"127.0.0.1:{gcs}", temp_dir, procs
    finally:
        procs.stop_all(grace=15)
        left = procs.still_running()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes still running after teardown: {left}"


@pytest.mark.skipif(not _ray_address_supported(), reason="`fedkn run` has no --ray-address yet (see docs/deployment.md)")
def test_fedkn_run_attaches_to_ray_cluster(tmp_path: Path, ray_head: tuple[str, Path, Processes]) -> None:
    address, temp_dir, procs = ray_head
    out = tmp_path / "runs"
    sets = [f"{k}={v}" for k, v in {**TINY, "output-dir": str(out)}.items()]
    argv = [str(BIN / "fedkn"), "run", "--ray-address", address]
    for s in sets:
        argv += ["--set", s]
    run = procs.start("fedkn-run", argv)
    try:
        run.popen.wait(timeout=180)
    except subprocess.TimeoutExpired:
        procs.kill(run)
        raise AssertionError(f"`fedkn run --ray-address` did not finish in 180 s\n{tails(procs.logs())}") from None
    output = run.log.read_text(errors="replace")
    assert run.popen.returncode == 0, output[-4000:]
    (run_dir,) = run_dirs(out)
    assert [int(r["round"]) for r in read_metrics(run_dir)] == [0, 1, 2]
    # The driver joined *this* cluster: its log is in the head node's session directory.
    logs = list((temp_dir / "session_latest" / "logs").glob("python-core-driver-*.log"))
    assert logs, f"no driver joined the Ray cluster in {temp_dir}\n{output[-3000:]}"
    print("\n" + "\n".join(line for line in output.splitlines() if line.startswith(("round", "done"))))
