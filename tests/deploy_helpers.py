"""Start and stop a real Flower deployment (SuperLink + SuperNodes) on 127.0.0.1 for the tests.

Every process is started in its own session (``start_new_session``) with its pid recorded; Flower's
own children (SuperExec, ServerApp, ClientApp processes, which Flower starts in *new* sessions)
are found through ``/proc`` and recorded too, so :meth:`Processes.stop_all` ends exactly what the
test started: SIGTERM, a bounded wait, then SIGKILL. Every wait here is bounded and fails with
the tails of the relevant logs, so a hang fails the test instead of the CI job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: The Flower app that `flwr run` submits (the repository root, whose pyproject.toml has [tool.flwr.app]).
APP_DIR = Path(os.environ.get("FEDKN_DEPLOY_APP_DIR", str(REPO)))
BIN = Path(sys.executable).parent

#: The tiniest useful run: 2 clients, 2 rounds, a 1/8-width KernelNorm ResNet-8 on embedded digits.
TINY: dict[str, Any] = {
    "num-clients": 2,
    "num-rounds": 2,
    "width": 0.125,
    "local-steps": 2,
    "partition": "iid",
}

#: Environment for every process: no telemetry, no update check, no runtime `uv sync`.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}


# --------------------------------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on 127.0.0.1 right now."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, *, interval: float = 0.5, logs: Sequence[Path] = ()) -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails(logs)}")
        time.sleep(interval)


def tails(paths: Iterable[Path], lines: int = 25) -> str:
    out = []
    for p in paths:
        try:
            text = Path(p).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        out.append(f"----- {p.name} (last {len(text)} lines) -----\n" + "\n".join(text))
    return "\n".join(out)


def run_config_arg(values: dict[str, Any]) -> str:
    """``{"num-rounds": 2, "output-dir": "/x"}`` -> ``num-rounds=2 output-dir='/x'`` for --run-config."""
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            if "'" in str(v) or " " in str(v):
                raise ValueError(f"run config value {v!r} cannot be passed on the command line")
            parts.append(f"{k}='{v}'")
    return " ".join(parts)


def write_flwr_config(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> Path:
    """The connection profile ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml`` (made the default)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_certificates}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie is not running; nothing to stop
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``pid`` (children, grandchildren...)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
                starts[int(entry)] = st[1]
    out: dict[int, int] = {}
    stack = list(children.get(pid, []))
    while stack:
        p = stack.pop()
        if p not in out:
            out[p] = starts[p]
            stack.extend(children.get(p, []))
    return out


def _alive(pid: int, start: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[1] == start  # same start time: not a recycled pid


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    start: int
    family: dict[int, int] = field(default_factory=dict)  # descendants seen so far: pid -> start time

    @property
    def pid(self) -> int:
        return self.popen.pid

    def refresh(self) -> None:
        if self.popen.poll() is None:
            self.family.update(descendants(self.pid))


class Processes:
    """Starts processes (each in its own session, pid recorded) and stops all of them."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.procs: list[Proc] = []
        self.logdir = workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: Sequence[str], *, cwd: Path | None = None) -> Proc:
        log = self.logdir / f"{name}.log"
        fh = open(log, "ab")  # noqa: SIM115 - closed right after Popen dups it
        try:
            popen = subprocess.Popen(
                list(argv), cwd=cwd or self.workdir, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            fh.close()
        st = _proc_stat(popen.pid)
        proc = Proc(name, popen, log, st[1] if st else 0)
        self.procs.append(proc)
        return proc

    def logs(self) -> list[Path]:
        return [p.log for p in self.procs]

    def refresh(self) -> None:
        for p in self.procs:
            p.refresh()

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        """Kill ``proc`` and every descendant it has now (a machine dying), and reap it."""
        proc.refresh()
        family = dict(proc.family)
        _signal(proc.pid, proc.start, sig, group=True)
        for pid, start in family.items():
            _signal(pid, start, sig, group=False)
        try:
            proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal(proc.pid, proc.start, signal.SIGKILL, group=True)
            proc.popen.wait(timeout=10)

    def stop_all(self, grace: float = 10.0) -> list[str]:
        """SIGTERM everything (newest first), wait up to ``grace`` s, SIGKILL what is left.

        Returns the names of processes that needed SIGKILL (for diagnostics only).
        """
        self.refresh()
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                _signal(p.pid, p.start, signal.SIGTERM, group=True)
        deadline = time.monotonic() + grace
        for p in reversed(self.procs):
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # Flower's detached children watch their parent pid and exit shortly after it; give them
        # the rest of the grace period, then kill whatever of the recorded family is still there.
        family = {pid: start for p in self.procs for pid, start in p.family.items()}
        wait_until(
            lambda: not any(_alive(pid, s) for pid, s in family.items()) or time.monotonic() > deadline,
            grace + 5, "children to exit",
        )
        killed = []
        for p in self.procs:
            if p.popen.poll() is None:
                killed.append(p.name)
                _signal(p.pid, p.start, signal.SIGKILL, group=True)
                try:
                    p.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:  # pragma: no cover - a process in D state
                    pass
        for pid, start in family.items():
            if _alive(pid, start):
                killed.append(str(pid))
                _signal(pid, start, signal.SIGKILL, group=False)
        return killed

    def still_running(self) -> list[int]:
        """Recorded pids that are still alive (should be empty after :meth:`stop_all`)."""
        out = [p.pid for p in self.procs if p.popen.poll() is None]
        out += [pid for p in self.procs for pid, s in p.family.items() if _alive(pid, s)]
        return out


def _signal(pid: int, start: int, sig: int, *, group: bool) -> None:
    if not _alive(pid, start):
        return
    try:
        if group:
            os.killpg(pid, sig)  # the session leader's pid is its process group id
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------------------------------
# a loopback deployment
# --------------------------------------------------------------------------------------------------


@dataclass
class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1 with an isolated FLWR_HOME; ``flwr`` commands for it."""

    root: Path
    procs: Processes
    port: int
    flwr_home: Path
    certs: dict[str, Path] | None = None
    connection: str = "loopback"
    nodes: dict[int, Proc] = field(default_factory=dict)
    link: Proc | None = None

    @classmethod
    def create(cls, root: Path, *, tls: bool = False, auth: bool = False, num_nodes: int = 2) -> Deployment:
        flwr_home = root / "flwr-home"
        env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(flwr_home)}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        if "FEDKN_DEPLOY_APP_DIR" in os.environ:  # testing a patched copy of the app
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP_DIR), env.get("PYTHONPATH")]))
        certs = None
        if tls or auth:
            sys.path.insert(0, str(REPO / "scripts"))
            try:
                from gen_certs import generate
            finally:
                sys.path.pop(0)
            certs = generate(root / "certs", supernodes=[str(i) for i in range(num_nodes)] if auth else [])
        (port,) = free_ports(1)
        dep = cls(root, Processes(root, env), port, flwr_home, certs)
        write_flwr_config(flwr_home, dep.connection, f"127.0.0.1:{port}", certs["ca.crt"] if certs else None)
        return dep

    # -- commands ------------------------------------------------------------------------------------
    def tls_args_link(self) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        c = self.certs
        return ["--ssl-ca-certfile", str(c["ca.crt"]), "--ssl-certfile", str(c["server.crt"]), "--ssl-keyfile", str(c["server.key"])]

    def start_superlink(self, *, auth: bool = False) -> Proc:
        argv = [str(BIN / "flower-superlink"), *self.tls_args_link(), "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if auth:
            argv.append("--enable-supernode-auth")
        self.link = self.procs.start("superlink", argv)
        wait_until(self._link_ready, 60, "the SuperLink to answer /health", logs=[self.link.log])
        return self.link

    def _link_ready(self) -> bool:
        import httpx

        if self.link is not None and self.link.popen.poll() is not None:
            raise AssertionError(f"the SuperLink exited with {self.link.popen.returncode}\n{tails([self.link.log])}")
        scheme = "https" if self.certs else "http"
        verify: Any = ssl.create_default_context(cafile=str(self.certs["ca.crt"])) if self.certs else False
        try:
            return httpx.get(f"{scheme}://127.0.0.1:{self.port}/health", timeout=2.0, verify=verify).is_success
        except httpx.HTTPError:
            return False

    def start_supernode(self, index: int, node_config: dict[str, Any], *, auth: bool = False) -> Proc:
        (runtime_port,) = free_ports(1)
        argv = [str(BIN / "flower-supernode")]
        argv += ["--root-certificates", str(self.certs["ca.crt"])] if self.certs else ["--insecure"]
        if auth:
            argv += ["--auth-supernode-private-key", str(self.certs[f"supernode-{index}"])]  # type: ignore[index]
        argv += ["--superlink", f"127.0.0.1:{self.port}", "--port", str(runtime_port),
                 "--node-config", run_config_arg(node_config), "--max-wait-time", "120"]
        proc = self.procs.start(f"supernode-{index}", argv)
        self.nodes[index] = proc
        return proc

    def flwr(self, *args: str, timeout: float = 60.0, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run one ``flwr`` CLI command (bounded); its pid is recorded like every other process."""
        proc = self.procs.start(f"flwr-{args[0]}-{len(self.procs.procs)}", [str(BIN / "flwr"), *args], cwd=cwd)
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.procs.kill(proc)
            raise AssertionError(f"`flwr {' '.join(args)}` did not finish within {timeout:.0f}s\n{tails(self.procs.logs())}") from None
        text = proc.log.read_text(encoding="utf-8", errors="replace")
        return subprocess.CompletedProcess(proc.popen.args, proc.popen.returncode, text, "")

    def flwr_json(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        out = self.flwr(*args, "--format", "json", timeout=timeout).stdout
        start = out.find("{")
        if start < 0:
            raise AssertionError(f"`flwr {' '.join(args)} --format json` printed no JSON:\n{out}")
        return json.loads(out[start : out.rindex("}") + 1])

    def online_nodes(self) -> int:
        data = self.flwr_json("supernode", "list", self.connection)
        return sum(1 for n in data.get("nodes", []) if str(n.get("status", "")).lower() == "online")

    def wait_nodes_online(self, count: int, timeout: float = 60.0) -> None:
        wait_until(lambda: self.online_nodes() >= count, timeout, f"{count} SuperNodes online", interval=1.0,
                   logs=self.procs.logs())

    def register(self, index: int) -> None:
        pub = self.certs[f"supernode-{index}.pub"]  # type: ignore[index]
        res = self.flwr("supernode", "register", str(pub), self.connection)
        assert res.returncode == 0 and "registered" in res.stdout, res.stdout

    def submit(self, run_config: dict[str, Any], timeout: float = 150.0) -> tuple[subprocess.CompletedProcess[str], float]:
        """``flwr run <app> <connection> --stream --run-config ...``; (result, wall seconds)."""
        t0 = time.perf_counter()
        res = self.flwr("run", str(APP_DIR), self.connection, "--stream", "--run-config", run_config_arg(run_config),
                        timeout=timeout, cwd=APP_DIR)
        return res, time.perf_counter() - t0

    def submit_background(self, run_config: dict[str, Any]) -> Proc:
        """The same ``flwr run ... --stream``, not waited for (the caller waits, bounded)."""
        argv = [str(BIN / "flwr"), "run", str(APP_DIR), self.connection, "--stream", "--run-config", run_config_arg(run_config)]
        return self.procs.start("flwr-run", argv, cwd=APP_DIR)

    def runs(self) -> list[dict[str, Any]]:
        return list(self.flwr_json("list", self.connection).get("runs", []))


def run_dirs(output_dir: Path) -> list[Path]:
    return sorted(p for p in output_dir.iterdir() if p.is_dir()) if output_dir.exists() else []


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
