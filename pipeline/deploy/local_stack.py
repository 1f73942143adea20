"""The local development stack: a SeaweedFS S3 server and a token-auth Ray head on loopback.

`stack up` starts a small background process (`python -m pipeline.deploy.local_stack DIR`) that
owns both services (SeaweedFS and Ray are stopped when their owner exits), writes DIR/state.json
once both answer, and stays until `stack down` sends it SIGTERM. `stack env` prints the
variables to export. The credentials are throwaway ones generated for this stack; they live only
in SeaweedFS's own identity file and a 0600 token file in DIR, never in state.json.

The S3 data (and its keys) stay in DIR/seaweed across `stack down` / `stack up`; `stack down
--wipe` removes them with everything else the stack wrote to DIR. Every port of both services is
on loopback; `stack up` checks that and lists any that is not (state["exposed"]).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from pipeline.errors import UserError

STATE = "state.json"
TOKEN_FILE = "ray-token"
ERROR_FILE = "start-error"  # the owner's one-line reason when it could not start
LOG_FILE = "stack.log"
SEAWEED_DIR = "seaweed"
OWNED = (STATE, STATE + ".tmp", TOKEN_FILE, ERROR_FILE, LOG_FILE, SEAWEED_DIR)  # what --wipe removes
START_TIMEOUT_S = 240.0
# weed takes ~25 s to exit on SIGTERM (it drains idle gRPC streams); every write it acknowledged
# is already in its files, so a short grace before SIGKILL loses nothing (the stack test proves
# the data survives down + up).
SEAWEED_STOP_GRACE_S = 3.0


def builtin_dir() -> Path:
    return Path.home() / ".cache" / "moola-pipeline" / "stack"


def default_dir() -> Path:
    return Path(os.environ.get("MOOLA_STACK_DIR") or builtin_dir())


def command(stack_dir: Path, sub: str) -> str:
    """`moola-pipeline stack SUB`, with the `--dir` that reaches this stack from any shell."""
    line = f"moola-pipeline stack {sub}"
    if Path(stack_dir) != builtin_dir():
        line += f" --dir {shlex.quote(str(stack_dir))}"
    return line


def _state_file(stack_dir: Path) -> dict | None:
    try:
        return json.loads((stack_dir / STATE).read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # written atomically, so only a hand-edited file gets here
        raise UserError(f"{stack_dir / STATE} is not the stack's state file; delete it") from None


def read_state(stack_dir: Path) -> dict | None:
    """The running stack's state, or None (no state, or its owner is gone)."""
    state = _state_file(stack_dir)
    return state if state and _alive(state["pid"]) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def env_for(stack_dir: Path, state: dict) -> dict[str, str]:
    """The variables a shell (or a test) exports to use the stack. RAY_ADDRESS is the job
    server, for submit/status/logs/list/stop; `train` joins a cluster only with --address."""
    from pipeline.devstack.ray_head import LOOPBACK_ENV
    from pipeline.devstack.seaweed import read_s3_keys

    access_key, secret_key = read_s3_keys(state["seaweed_dir"])
    return {
        "AWS_ENDPOINT_URL": state["s3_endpoint"], "AWS_ENDPOINT_URL_S3": state["s3_endpoint"],
        "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "RAY_ADDRESS": state["dashboard_url"],
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": (stack_dir / TOKEN_FILE).read_text().strip(),
        # the Ray head is on 127.0.0.1; without this a driver rewrites that to the machine's address
        **LOOPBACK_ENV,
    }


def start(stack_dir: Path, num_cpus: int) -> dict:
    """Start the stack's owner process in the background; return its state once ready."""
    if read_state(stack_dir):
        raise UserError(f"a local stack is already running from {stack_dir}",
                        hint=f"`{command(stack_dir, 'env')}` prints its variables; "
                             f"`{command(stack_dir, 'down')}` stops it")
    stop(stack_dir)  # what a crashed owner left: its state file, an orphaned Ray head
    stack_dir.mkdir(parents=True, exist_ok=True)
    (stack_dir / ERROR_FILE).unlink(missing_ok=True)
    log_path = stack_dir / LOG_FILE
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.deploy.local_stack", str(stack_dir),
                                 str(num_cpus)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the local stack did not start: {_start_error(stack_dir)} "
                            f"(full log: {log_path})")
        state = read_state(stack_dir)
        if state:
            return state
        time.sleep(0.5)
    proc.terminate()  # the owner stops whatever it had started
    proc.wait(timeout=60)
    raise UserError(f"the local stack did not become ready in {START_TIMEOUT_S:.0f} s "
                    f"(log {log_path})")


def _start_error(stack_dir: Path) -> str:
    try:
        return (stack_dir / ERROR_FILE).read_text().strip() or "no reason given"
    except OSError:
        lines = (stack_dir / LOG_FILE).read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "the owner process exited without a word"


def stop(stack_dir: Path, *, wipe: bool = False, timeout_s: float = 60.0) -> bool:
    """SIGTERM the owner (it stops Ray and SeaweedFS); with `wipe`, also remove the data and
    everything else the stack wrote to stack_dir. False when nothing was running."""
    state = _state_file(stack_dir)
    running = bool(state) and _alive(state["pid"])
    if running:
        os.kill(state["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(state["pid"]) and time.monotonic() < deadline:
            time.sleep(0.3)
        if _alive(state["pid"]):
            raise UserError(f"the local stack (pid {state['pid']}) did not stop in {timeout_s:.0f} s")
    elif state:  # the owner died without cleaning up: its Ray daemons outlive it (weed does not)
        _stop_orphaned_ray(state)
    for name in (STATE, TOKEN_FILE):
        (stack_dir / name).unlink(missing_ok=True)
    if wipe:
        _wipe(stack_dir)
    return running


def _stop_orphaned_ray(state: dict) -> None:
    from pipeline.devstack.ray_head import RayHead

    if state.get("ray_temp_dir"):
        RayHead(gcs_address="", dashboard_url="", token="", temp_dir=Path(state["ray_temp_dir"]),
                num_cpus=0, client_port=0, cluster_id=state.get("ray_cluster_id", "")).stop()


def _wipe(stack_dir: Path) -> None:
    """Remove only what the stack wrote: `--dir` may name a directory that holds other things."""
    for name in OWNED:
        path = stack_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    try:
        stack_dir.rmdir()
    except OSError:  # not empty (someone else's files) or already gone
        pass


def serve(stack_dir: Path, num_cpus: int) -> int:
    """The owner process: start both services, publish state, wait for SIGTERM, stop both.
    A failure to start is written as one line to ERROR_FILE (the traceback goes to the log)."""
    from pipeline.devstack.ray_head import start_ray_head
    from pipeline.devstack.seaweed import launch_seaweed, read_s3_keys

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    server = head = None
    try:
        try:
            # the same keys as last time: the data was written with them
            keys = read_s3_keys(stack_dir / SEAWEED_DIR) or (None, None)
            server = launch_seaweed(stack_dir / SEAWEED_DIR, *keys)
            # Ray workers inherit these, so training on the stack's Ray reaches the stack's S3;
            # both start at once (Ray needs only the endpoint and keys, known at launch).
            head = start_ray_head(num_cpus, extra_env=server.env(), loopback=True)
            server.wait_ready()
            _publish(stack_dir, server, head, num_cpus)
        except Exception as exc:
            traceback.print_exc()
            (stack_dir / ERROR_FILE).write_text(_one_line(exc) + "\n")
            return 1
        print(f"local stack up: S3 {server.endpoint}, Ray {head.address}, "
              f"jobs {head.dashboard_url}", flush=True)
        while not stopping and server.alive():
            time.sleep(0.5)
        return 0
    finally:
        (stack_dir / STATE).unlink(missing_ok=True)
        (stack_dir / TOKEN_FILE).unlink(missing_ok=True)
        if head:
            head.stop()
        if server:
            server.stop(grace_s=SEAWEED_STOP_GRACE_S)
        print("local stack stopped", flush=True)


def _publish(stack_dir: Path, server, head, num_cpus: int) -> None:
    """Write the token file and then state.json (atomically: its presence means ready)."""
    from pipeline.devstack.sockets import exposed, process_tree

    token_path = stack_dir / TOKEN_FILE
    token_path.touch(mode=0o600)
    token_path.write_text(head.token)
    open_ports = exposed(process_tree(server.process.pid) + head.processes())
    state = {"pid": os.getpid(), "s3_endpoint": server.endpoint, "ray_address": head.address,
             "dashboard_url": head.dashboard_url, "ray_temp_dir": str(head.temp_dir),
             "ray_cluster_id": head.cluster_id, "seaweed_dir": str(server.workdir),
             "num_cpus": num_cpus, "exposed": [str(l) for l in open_ports]}
    tmp = stack_dir / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, stack_dir / STATE)


def _one_line(exc: BaseException) -> str:
    text = (exc.format_message() if isinstance(exc, UserError) else str(exc)).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(exc, UserError) else f"{type(exc).__name__}: {first}"


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1]), int(sys.argv[2])))
