"""Waiting for what `up` created: the pod (or cluster) running, then the Ray job server answering.

RUNNING is not ready (ecosystem notes 3.7): the container may still be starting Ray. Ready means
an authenticated request to the Ray job server (`GET /api/jobs/`) answers 200 through the
address a user will give `submit`. The address is the RunPod HTTP proxy of port 8265 on the head
pod; MOOLA_RUNPOD_PROXY_URL overrides the pattern ({pod_id}, {port}), e.g. for an SSH tunnel.
"""

from __future__ import annotations

import os
import time

from pipeline.errors import UserError

DASHBOARD_PORT = 8265
PROXY_URL = "https://{pod_id}-{port}.proxy.runpod.net"


def head_address(pod_id: str) -> str:
    pattern = os.environ.get("MOOLA_RUNPOD_PROXY_URL", PROXY_URL)
    return pattern.format(pod_id=pod_id, port=DASHBOARD_PORT).rstrip("/")


def pod_is_running(pod: dict | None) -> bool:
    """RunPod reports a started container through `runtime` (null until the container runs)."""
    return bool(pod) and pod.get("desiredStatus") == "RUNNING" and pod.get("runtime") is not None


def probe_ray_head(address: str, token: str, timeout_s: float = 5.0) -> str | None:
    """None when the job server answers an authenticated request; else why not (one line)."""
    import requests

    try:
        resp = requests.get(f"{address}/api/jobs/", timeout=timeout_s,
                            headers={"Authorization": f"Bearer {token}"})
    except requests.RequestException as exc:
        return f"no answer ({type(exc).__name__})"
    if resp.status_code in (401, 403):
        raise UserError(f"the Ray head at {address} refused RAY_AUTH_TOKEN ({resp.status_code})",
                        hint="the token in your environment differs from the one the cluster started with")
    if resp.status_code != 200:
        return f"HTTP {resp.status_code}"
    return None


def wait_until(check, what: str, timeout_s: float, interval_s: float = 2.0, on_wait=None):
    """Call `check()` until it returns a truthy value; `UserError` naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise UserError(f"{what} not ready after {timeout_s:.0f} s",
                            hint="it is still recorded; `moola-pipeline runpod status` shows it, "
                                 "`moola-pipeline runpod down` terminates it")
        if on_wait:
            last = on_wait(last)
        time.sleep(interval_s)
