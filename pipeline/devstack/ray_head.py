"""A real single-node Ray cluster (`ray start --head`) with token auth, for development and tests.

`start_ray_head(num_cpus=4)` runs `ray start --head` with token authentication on, the dashboard
(and so the job server) bound to loopback, its own short `--temp-dir`, and free ports for
everything Ray would otherwise put on a fixed default (GCS 6379, dashboard 8265, client server
10001, dashboard agent 52365): several clusters share this machine, and a head whose agent cannot
bind 52365 answers every job submission with HTTP 500 "No available agent". It returns when the
job server answers an authenticated request and the agent listens. `RayHead.stop()` ends exactly
this cluster's processes.

Why not `ray stop`: it kills every Ray process on the machine, including other people's
clusters. Instead we find this cluster's processes by what only they have: a random cluster id
in their environment (`MOOLA_RAY_CLUSTER_ID`: every daemon, worker and job entrypoint inherits it
from `ray start`, and unlike the token it is never exported to a user's shell, so `stack down`
run from a shell holding the token does not signal that shell) or our temp dir on their command
line, plus their descendants. We SIGTERM that set and SIGKILL what is
left after a grace period.

Ray resolves a loopback `--node-ip-address` to the machine's address (services.py
`resolve_ip_for_localhost`), so the GCS address is `<node ip>:<port>`; the dashboard host is
honoured and stays on 127.0.0.1. The GCS, raylet, agents, metrics and workers then listen on all
interfaces or on that address. `start_ray_head(loopback=True)` (the local stack) keeps every port
on 127.0.0.1: Ray on Linux has no bind-address option, but with
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (ray_constants.ENABLE_RAY_CLUSTER off) its node address
*is* 127.0.0.1 (services.get_node_ip_address returns the loopback address, as on a laptop), and
every Ray server binds the node address. The price: no other node can join such a head, and a
driver must carry the same variable (it is in `env()`), or it rewrites 127.0.0.1 to the
machine's address and cannot reach the GCS.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError

STARTUP_TIMEOUT_S = 120.0
STOP_GRACE_S = 2.0  # gcs_server, raylet and the monitor ignore SIGTERM here; tests flush nothing
CLUSTER_ID_VAR = "MOOLA_RAY_CLUSTER_ID"
# Ray's switch (ray/_private/ray_constants.py) that, off, makes 127.0.0.1 the node address.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
OBJECT_STORE_BYTES = 256 * 1024**2  # tests move checkpoints through files, not the object store


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (held open together so they differ)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_executable() -> str:
    """The `ray` script next to this Python (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if not found:
        raise UserError("the `ray` command was not found; install ray[default,train]")
    return found


@dataclass
class RayHead:
    gcs_address: str  # "ip:port", for `ray start --address` and `train --address`
    dashboard_url: str  # "http://127.0.0.1:port", the job server
    token: str
    temp_dir: Path
    num_cpus: int
    client_port: int
    cluster_id: str = ""  # MOOLA_RAY_CLUSTER_ID in the environment of the cluster's processes
    loopback: bool = False  # every port on 127.0.0.1 (see the module docstring)
    _stopped: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return self.gcs_address

    def env(self) -> dict[str, str]:
        """Variables a subprocess needs to talk to this cluster (token auth on, the token; for a
        loopback head, the switch that lets a driver reach 127.0.0.1).

        No RAY_ADDRESS: connecting is always explicit (`--address`), see DESIGN.md."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                **(LOOPBACK_ENV if self.loopback else {})}

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def log_dir(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def processes(self) -> list:
        """Every live process of this cluster (see the module docstring for how we know)."""
        import psutil

        temp = str(self.temp_dir)
        roots = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.pid == os.getpid():
                    continue
                names_us = any(temp in arg for arg in (proc.info["cmdline"] or []))
                marked = bool(self.cluster_id) and \
                    proc.environ().get(CLUSTER_ID_VAR) == self.cluster_id
                if names_us or marked:
                    roots[proc.pid] = proc
            except psutil.Error:
                continue
        found = dict(roots)
        for proc in roots.values():
            try:
                for child in proc.children(recursive=True):
                    found[child.pid] = child
            except psutil.Error:
                continue
        found.pop(os.getpid(), None)
        return [p for p in found.values() if _running(p)]

    def alive(self) -> bool:
        return bool(self.processes())

    def stop(self, keep_temp_dir: bool = False) -> None:
        """SIGTERM every process of this cluster, SIGKILL the rest after a grace period."""
        if self._stopped:
            return
        procs = self.processes()
        _signal_all(procs, signal.SIGTERM)
        alive = _wait_gone(procs, STOP_GRACE_S)
        # processes may have spawned children while stopping: sweep once more
        alive = {p.pid: p for p in alive + self.processes()}
        _signal_all(alive.values(), signal.SIGKILL)
        _wait_gone(list(alive.values()), STOP_GRACE_S)
        self._stopped = True
        if not keep_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayHead":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_all(procs, sig) -> None:
    import psutil

    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list, timeout_s: float) -> list:
    """Wait until every process has exited; returns those still running. A zombie counts as
    gone: Ray's daemons are reparented to PID 1, which in a container may never reap them."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for proc in procs:
            if _running(proc):
                alive.append(proc)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def start_ray_head(num_cpus: int = 4, *, token: str | None = None, temp_dir: str | Path | None = None,
                   extra_env: dict[str, str] | None = None, node_ip_address: str | None = None,
                   loopback: bool = False, timeout_s: float = STARTUP_TIMEOUT_S) -> RayHead:
    """Start a token-auth Ray head on free ports; returns when its job server answers.
    `loopback=True`: every port on 127.0.0.1, and no other node can join."""
    if loopback and node_ip_address not in (None, "127.0.0.1"):
        raise ValueError(f"loopback=True and node_ip_address={node_ip_address!r} contradict")
    token = token or secrets.token_hex(24)
    # short path: Ray's unix socket paths live under it and are limited to 107 bytes
    temp_dir = Path(temp_dir) if temp_dir else Path(tempfile.mkdtemp(prefix="mray-", dir="/tmp"))
    temp_dir.mkdir(parents=True, exist_ok=True)
    (gcs_port, dashboard_port, client_port, agent_port, metrics_port, autoscaler_metrics_port,
     dashboard_metrics_port) = free_ports(7)

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster
    cluster_id = secrets.token_hex(8)
    env.update({
        CLUSTER_ID_VAR: cluster_id,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        # job entrypoints run `python`/`moola-pipeline` from PATH: make it this environment's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        # fixed by default (44217, 44227), so a second cluster on this machine would clash
        "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics_port),
        "DASHBOARD_METRIC_PORT": str(dashboard_metrics_port),
        **(LOOPBACK_ENV if loopback else {}),
    })
    env.update(extra_env or {})
    cmd = [
        ray_executable(), "start", "--head",
        "--port", str(gcs_port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--include-dashboard", "true",
        "--ray-client-server-port", str(client_port),
        "--dashboard-agent-listen-port", str(agent_port),
        "--metrics-export-port", str(metrics_port),
        "--num-cpus", str(num_cpus), "--num-gpus", "0",
        "--object-store-memory", str(OBJECT_STORE_BYTES),
        "--temp-dir", str(temp_dir),
        "--disable-usage-stats",
    ]
    if node_ip_address or loopback:
        cmd += ["--node-ip-address", node_ip_address or "127.0.0.1"]
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    head = RayHead(gcs_address="", dashboard_url=f"http://127.0.0.1:{dashboard_port}", token=token,
                   temp_dir=temp_dir, num_cpus=num_cpus, client_port=client_port,
                   cluster_id=cluster_id, loopback=loopback)
    atexit.register(head.stop)  # a crashed test session still leaves no cluster behind
    try:
        rc = proc.wait(timeout=timeout_s)
        if rc != 0:
            raise RuntimeError(f"`ray start --head` exited {rc}:\n{log_path.read_text()[-3000:]}")
        head.gcs_address = (temp_dir / "ray_current_cluster").read_text().strip()
        _wait_for_job_server(head, deadline=time.monotonic() + timeout_s)
    except BaseException:
        head.stop(keep_temp_dir=True)
        raise
    return head


def _wait_for_job_server(head: RayHead, deadline: float) -> None:
    """Poll until the jobs API answers 200 with the token and the head's dashboard agent (which
    runs the submitted jobs) listens. Both come up a while after `ray start` returns; before the
    agent does, a submit gets HTTP 500 "No available agent"."""
    import socket

    import requests

    last = None
    host = head.gcs_address.rsplit(":", 1)[0]
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{head.dashboard_url}/api/jobs/", headers=head.auth_headers(), timeout=5)
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            port_files = list((head.temp_dir / "session_latest").glob("dashboard_agent_listen_port_*"))
            if r.status_code == 200 and port_files:
                port = int(port_files[0].read_text().strip() or 0)
                last = f"dashboard agent not listening on {host}:{port}"
                with socket.create_connection((host, port), timeout=2):
                    return
        except (requests.RequestException, OSError, ValueError) as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise RuntimeError(f"Ray job server at {head.dashboard_url} did not come up: {last} "
                       f"(logs kept in {head.log_dir()})")
