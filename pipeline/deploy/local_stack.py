"""The local development stack: a SeaweedFS S3 server and a token-auth Ray head on loopback.

`stack up` starts a small background process (`python -m pipeline.deploy.local_stack DIR`) that
owns both services (SeaweedFS and Ray are stopped when their owner exits), writes DIR/state.json
once both answer, and stays until `stack down` sends it SIGTERM. `stack env` prints the
variables to export. The credentials are throwaway ones generated for this stack; they live only
in SeaweedFS's own identity file and a 0600 token file in DIR, never in state.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import UserError

STATE = "state.json"
TOKEN_FILE = "ray-token"
START_TIMEOUT_S = 240.0


def default_dir() -> Path:
    return Path(os.environ.get("MOOLA_STACK_DIR") or Path.home() / ".cache" / "moola-pipeline" / "stack")


def read_state(stack_dir: Path) -> dict | None:
    path = stack_dir / STATE
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    return state if _alive(state["pid"]) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def env_for(stack_dir: Path, state: dict) -> dict[str, str]:
    """The variables a shell (or a test) exports to use the stack."""
    s3 = json.loads((Path(state["seaweed_dir"]) / "s3-config.json").read_text())
    creds = s3["identities"][0]["credentials"][0]
    return {
        "AWS_ENDPOINT_URL": state["s3_endpoint"], "AWS_ENDPOINT_URL_S3": state["s3_endpoint"],
        "AWS_ACCESS_KEY_ID": creds["accessKey"], "AWS_SECRET_ACCESS_KEY": creds["secretKey"],
        "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": (stack_dir / TOKEN_FILE).read_text().strip(),
    }


def start(stack_dir: Path, num_cpus: int) -> dict:
    """Start the stack's owner process in the background; return its state once ready."""
    if read_state(stack_dir):
        raise UserError(f"a local stack is already running from {stack_dir}",
                        hint="`moola-pipeline stack env` prints its variables; `stack down` stops it")
    stack_dir.mkdir(parents=True, exist_ok=True)
    (stack_dir / STATE).unlink(missing_ok=True)
    log = open(stack_dir / "stack.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.deploy.local_stack", str(stack_dir),
                             str(num_cpus)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (stack_dir / "stack.log").read_text(errors="replace")[-1500:]
            raise UserError(f"the local stack failed to start (log {stack_dir / 'stack.log'}):\n{tail}")
        state = read_state(stack_dir)
        if state:
            return state
        time.sleep(0.5)
    proc.terminate()
    raise UserError(f"the local stack did not become ready in {START_TIMEOUT_S:.0f} s "
                    f"(log {stack_dir / 'stack.log'})")


def stop(stack_dir: Path, timeout_s: float = 60.0) -> bool:
    """SIGTERM the owner (it stops Ray and SeaweedFS); False when nothing was running."""
    state = read_state(stack_dir)
    if not state:
        (stack_dir / STATE).unlink(missing_ok=True)
        return False
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(state["pid"]) and time.monotonic() < deadline:
        time.sleep(0.3)
    if _alive(state["pid"]):
        raise UserError(f"the local stack (pid {state['pid']}) did not stop in {timeout_s:.0f} s")
    return True


def serve(stack_dir: Path, num_cpus: int) -> None:
    """The owner process: start both services, publish state, wait for SIGTERM, stop both."""
    from pipeline.devstack.ray_head import start_ray_head
    from pipeline.devstack.seaweed import start_seaweed

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    server = start_seaweed(stack_dir / "seaweed")
    head = None
    try:
        # Ray workers inherit these, so training on the stack's Ray reaches the stack's S3.
        head = start_ray_head(num_cpus, extra_env=server.env())
        token_path = stack_dir / TOKEN_FILE
        token_path.touch(mode=0o600)
        token_path.write_text(head.token)
        state = {"pid": os.getpid(), "s3_endpoint": server.endpoint, "ray_address": head.address,
                 "dashboard_url": head.dashboard_url, "ray_temp_dir": str(head.temp_dir),
                 "seaweed_dir": str(server.workdir), "num_cpus": num_cpus}
        tmp = stack_dir / (STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, stack_dir / STATE)
        print(f"local stack up: S3 {server.endpoint}, Ray {head.address}", flush=True)
        while not stopping and server.alive():
            time.sleep(0.5)
    finally:
        (stack_dir / STATE).unlink(missing_ok=True)
        (stack_dir / TOKEN_FILE).unlink(missing_ok=True)
        if head:
            head.stop()
        server.stop()
        print("local stack stopped", flush=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
