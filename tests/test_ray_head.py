"""The dev/test Ray head stops exactly its own processes."""

import os
import subprocess
import sys

import pytest


@pytest.mark.ray
def test_processes_are_found_by_cluster_id_not_by_token(ray_cluster):
    procs = {p.pid for p in ray_cluster.processes()}
    assert procs, "a running head has processes"
    # A user's shell that exported the stack's token (as `stack env` prints) is not the cluster's.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                 env={**os.environ, **ray_cluster.env()})
    try:
        assert bystander.pid not in {p.pid for p in ray_cluster.processes()}
    finally:
        bystander.kill()
        bystander.wait()
