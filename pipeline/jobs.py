"""Ray Jobs: submit a `train` run to a cluster, then status, logs, stop and list.

A thin wrapper around Ray's `JobSubmissionClient` that adds what a user of this project needs:
the token sent as an `Authorization: Bearer` header (from `--token` or RAY_AUTH_TOKEN), a
runtime_env that ships the code and the non-secret variables the job needs, a hard guarantee
that no credential ends up in the entrypoint, runtime_env or metadata (the job server stores and
shows all three; the cluster's nodes get credentials from their own environment), and one clear
`UserError` for every failure a user can cause (unreachable server, missing or wrong token,
unknown job id, failed job).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline import __version__
from pipeline.errors import UserError

# Never shipped to a job, whatever the user asks; their values are also searched for in
# everything we send.
CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "RAY_AUTH_TOKEN", "RUNPOD_API_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
)
# Non-secret settings a training job needs to reach the same storage and tracking as the
# submitter; copied from the submitter's environment when set.
FORWARDED_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                  "MLFLOW_TRACKING_URI")
# working_dir is zipped and uploaded through the head: ship the code, not environments or data.
# Ray already skips .git and .venv and honours .gitignore; gitignore syntax, so a leading "/"
# anchors at the top (a bare "data/" would also drop pipeline/data/).
WORKING_DIR_EXCLUDES = ["/runs/", "/data/", "/demo/", "/bench/out/", "__pycache__/", "*.pyc",
                        ".pytest_cache/", ".hypothesis/", "*.egg-info/", "*.parquet"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
REQUEST_TIMEOUT_S = 15.0
AGENT_WAIT_S = 90.0
METADATA_RUN_URI = "moola_run_uri"


def job_server_address(address: str | None) -> str:
    """The job server URL from `--address` or RAY_ADDRESS; `HOST:PORT` gets `http://`."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if address in ("auto", "local") or address.startswith("ray://"):
        raise UserError(f"--address {address!r} is not a job server: use the dashboard URL "
                        "http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def auth_token(token: str | None) -> str | None:
    """`--token`, else RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else none."""
    token = token or os.environ.get("RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise UserError(f"cannot read RAY_AUTH_TOKEN_PATH {path}: {exc.strerror}") from None
    return token or None


def run_uri(train_args: list[str]) -> str:
    """The `--out` of the train arguments, checked for use on a cluster."""
    out = None
    for i, arg in enumerate(train_args):
        if arg == "--out" and i + 1 < len(train_args):
            out = train_args[i + 1]
        elif arg.startswith("--out="):
            out = arg.split("=", 1)[1]
    if not out:
        raise UserError("the train arguments need --out URI (after `--`): where the run is written")
    if "://" not in out and not os.path.isabs(out):
        raise UserError(f"--out {out}: a submitted run needs an s3:// URI or an absolute path on the "
                        "cluster (a relative path would land in the job's temporary working dir)")
    return out


def train_entrypoint(train_args: list[str]) -> str:
    """`moola-pipeline train ARGS`, joining the job's own cluster: a job's driver gets the
    cluster in RAY_ADDRESS, and `train` without --address would start a second, local Ray."""
    if not any(a == "--address" or a.startswith("--address=") for a in train_args):
        train_args = [*train_args, "--address", "auto"]
    return shlex.join(["moola-pipeline", "train", *train_args])


STOP_WAIT_VAR, STOP_WAIT_S = "RAY_JOB_STOP_WAIT_TIME_S", 30


def job_env_vars(extra: dict[str, str] | None = None, environ=None) -> dict[str, str]:
    """FORWARDED_VARS from the submitter's environment, plus `--env` pairs; never a credential."""
    environ = os.environ if environ is None else environ
    env = {name: environ[name] for name in FORWARDED_VARS if environ.get(name)}
    for name, value in (extra or {}).items():
        if name in CREDENTIAL_VARS:
            raise UserError(f"--env {name}: credentials are never sent with a job; set {name} in "
                            "the environment of the cluster's nodes instead")
        env[name] = value
    env["PYTHONUNBUFFERED"] = "1"  # so `logs --follow` shows lines as they are printed
    # `stop` sends SIGTERM, then SIGKILL after this many seconds (Ray's default 3): the driver
    # needs a few to write the report of the finished epochs and name the resume command
    env.setdefault(STOP_WAIT_VAR, str(STOP_WAIT_S))
    return env


def check_no_credentials(payload: dict, environ=None) -> None:
    """Refuse to send anything that contains the value of a credential variable."""
    environ = os.environ if environ is None else environ
    text = repr(payload)
    for name in CREDENTIAL_VARS:
        value = environ.get(name)
        if value and len(value) >= 4 and value in text:
            raise UserError(f"the job would carry the value of {name} (in its arguments or --env); "
                            "credentials are never sent with a job, the cluster's nodes read them "
                            "from their own environment")


@dataclass
class JobSummary:
    job_id: str
    status: str
    message: str
    entrypoint: str
    run_uri: str | None
    start_time: float | None  # seconds since the epoch
    end_time: float | None


class JobsClient:
    """One connection to a cluster's job server; every method raises UserError on user faults."""

    def __init__(self, address: str | None = None, token: str | None = None):
        self.address = job_server_address(address)
        self._token = auth_token(token)
        self._headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._probe()
        from ray.job_submission import JobSubmissionClient

        # Ray's client logs each upload step (and that .git/.venv are skipped) on stderr; our
        # commands print what matters, and real failures arrive as exceptions
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                     "ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir"):
            logging.getLogger(name).setLevel(logging.ERROR)

        with self._errors():
            self._client = JobSubmissionClient(self.address, headers=dict(self._headers))

    def _probe(self) -> None:
        """One request with a timeout before Ray's client (which has none) talks to the server."""
        import requests

        try:
            r = requests.get(f"{self.address}/api/version", headers=self._headers,
                             timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException as exc:
            raise UserError(self._unreachable(exc)) from None
        if r.status_code in (401, 403):
            raise UserError(self._auth_message(r.status_code))
        if r.status_code != 200:
            raise UserError(f"{self.address} is not a Ray job server (GET /api/version: HTTP "
                            f"{r.status_code}); use the dashboard URL http://HEAD:8265")

    def _unreachable(self, exc: Exception) -> str:
        kind = type(exc).__name__
        return (f"cannot reach the Ray job server at {self.address} ({kind}); check the address, "
                "that the cluster is up and that its dashboard port (8265 by default; not the GCS "
                "port 6379) is reachable; an SSH tunnel works for remote clusters")

    def _auth_message(self, status: int) -> str:
        if status == 401 or not self._token:
            return (f"the Ray cluster at {self.address} requires an auth token: pass --token or "
                    "set RAY_AUTH_TOKEN")
        return (f"the Ray cluster at {self.address} refused the auth token (HTTP 403): check "
                "--token / RAY_AUTH_TOKEN")

    @contextlib.contextmanager
    def _errors(self, job_id: str | None = None, following: bool = False):
        """Turn what Ray's client raises into one clear UserError."""
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as exc:
            raise UserError(self._auth_message(401 if "required" in str(exc) else 403)) from None
        except (requests.RequestException, ConnectionError, aiohttp.ClientError) as exc:
            if following:
                raise UserError(self._lost(job_id)) from None
            raise UserError(self._unreachable(exc)) from None
        except RuntimeError as exc:
            text = str(exc)
            if job_id and ("404" in text or "does not exist" in text):
                raise UserError(f"no job {job_id!r} on {self.address}: `moola-pipeline list` shows "
                                "the cluster's jobs") from None
            if "closed unexpectedly" in text or "WebSocket" in text:
                raise UserError(self._lost(job_id)) from None
            if text.startswith("Request failed with status code"):
                # the job server said no (bad runtime_env, package too large, ...): its words
                raise UserError(f"the job server at {self.address} refused the request: "
                                f"{text.splitlines()[0][:500]}") from None
            raise

    def _lost(self, job_id: str | None) -> str:
        return (f"lost the connection to {self.address}"
                + (f" while following job {job_id}" if job_id else "")
                + "; the job keeps running on the cluster (`moola-pipeline logs --follow` again "
                "to resume watching)")

    # --- the five operations -------------------------------------------------------------

    def submit(self, entrypoint: str, *, working_dir: str | None = None,
               env_vars: dict[str, str] | None = None, metadata: dict[str, str] | None = None,
               submission_id: str | None = None) -> str:
        runtime_env: dict = {"env_vars": dict(env_vars or {})}
        if working_dir:
            if not Path(working_dir).is_dir():
                raise UserError(f"--working-dir {working_dir}: not a directory")
            runtime_env["working_dir"] = str(Path(working_dir).resolve())
            runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
        metadata = {"moola_version": __version__, **(metadata or {})}
        check_no_credentials({"entrypoint": entrypoint, "runtime_env": runtime_env,
                              "metadata": metadata, "submission_id": submission_id})
        # A head that has just started answers 500 "No available agent" until its dashboard
        # agent registers: that is worth waiting for, as the server itself suggests.
        deadline = time.monotonic() + AGENT_WAIT_S
        with self._errors():
            while True:
                try:
                    return self._client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                                   metadata=metadata, submission_id=submission_id)
                except ValueError as exc:  # the packaged working_dir is too large, mostly
                    raise UserError(f"--working-dir {working_dir}: {str(exc).splitlines()[0]}") from None
                except RuntimeError as exc:
                    if submission_id and "already exists" in str(exc):
                        raise UserError(f"--job-id {submission_id}: a job with this id already "
                                        f"exists on {self.address}; pick another id") from None
                    if "No available agent" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(2)

    def info(self, job_id: str) -> JobSummary:
        with self._errors(job_id):
            return _summary(self._client.get_job_info(job_id))

    def logs(self, job_id: str) -> str:
        with self._errors(job_id):
            return self._client.get_job_logs(job_id)

    def follow(self, job_id: str) -> Iterator[str]:
        """Chunks of the job's output as it is written, until the job ends."""
        self.info(job_id)  # an unknown id fails here, clearly, before the websocket opens
        loop = asyncio.new_event_loop()
        stream = self._client.tail_job_logs(job_id)
        try:
            while True:
                with self._errors(job_id, following=True):
                    try:
                        chunk = loop.run_until_complete(stream.__anext__())
                    except StopAsyncIteration:
                        return
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(stream.aclose())
            loop.close()

    def stop(self, job_id: str, wait_s: float = 30.0) -> JobSummary:
        """Ask the job to stop and wait (up to wait_s) until it has."""
        with self._errors(job_id):
            self._client.stop_job(job_id)
        return self.wait(job_id, timeout_s=wait_s)

    def wait(self, job_id: str, timeout_s: float, poll_s: float = 0.5) -> JobSummary:
        deadline = time.monotonic() + timeout_s
        summary = self.info(job_id)
        while summary.status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(poll_s)
            summary = self.info(job_id)
        return summary

    def list(self) -> list[JobSummary]:
        with self._errors():
            jobs = [_summary(job) for job in self._client.list_jobs()]
        return sorted(jobs, key=lambda j: j.start_time or 0)


# Our CLI prints a user error as one `error: ...` line (pipeline/cli.py); lines from Ray workers
# carry a `(RayTrainWorker pid=...)` prefix.
_ERROR_LINE = re.compile(r"^(?:\([^)]*\)\s*)?error: (.+)$")


def last_error_line(logs: str) -> str | None:
    """The job's own reason for failing: its last `error: ...` line, without the prefix."""
    for line in reversed(logs.splitlines()):
        match = _ERROR_LINE.match(line.strip())
        if match:
            return match.group(1).strip()
    return None


def ray_reason(message: str) -> str:
    """Ray's failure message without the last 20,000 characters of output it appends."""
    text = message.strip()
    reason = text.splitlines()[0] if text else "no message"
    return reason.split(", last available logs")[0]


def failure_reason(client: "JobsClient", summary: JobSummary) -> str:
    """Why a FAILED job failed: its own last `error:` line when its logs have one (it says what
    to change), else Ray's message (an exit code, a crash)."""
    try:
        own = last_error_line(client.logs(summary.job_id))
    except UserError:  # the logs are gone (a head restarted): Ray's message is all there is
        own = None
    return own or ray_reason(summary.message)


def _summary(info) -> JobSummary:
    status = getattr(info.status, "value", str(info.status))
    ms = lambda t: t / 1000 if t else None  # noqa: E731 (Ray reports milliseconds)
    return JobSummary(job_id=info.submission_id or info.job_id, status=status,
                      message=info.message or "", entrypoint=info.entrypoint,
                      run_uri=(info.metadata or {}).get(METADATA_RUN_URI),
                      start_time=ms(info.start_time), end_time=ms(info.end_time))


@dataclass
class TrainJob:
    """What `submit` sends, checked before any connection is made."""
    entrypoint: str
    env_vars: dict[str, str]
    metadata: dict[str, str]
    run_uri: str | None


def train_job(train_args: list[str], env: dict[str, str] | None = None,
              entrypoint: str | None = None) -> TrainJob:
    """`moola-pipeline train TRAIN_ARGS` as a job (or a raw entrypoint, for diagnostics)."""
    uri = None
    if entrypoint is None:
        uri = run_uri(train_args)
        entrypoint = train_entrypoint(train_args)
    job = TrainJob(entrypoint=entrypoint, env_vars=job_env_vars(env),
                   metadata={METADATA_RUN_URI: uri} if uri else {}, run_uri=uri)
    check_no_credentials({"entrypoint": job.entrypoint, "env_vars": job.env_vars})
    return job


def submit_train(client: JobsClient, job: TrainJob, *, working_dir: str | None = ".",
                 submission_id: str | None = None) -> str:
    """Submit a prepared TrainJob; returns the job id."""
    return client.submit(job.entrypoint, working_dir=working_dir, env_vars=job.env_vars,
                         metadata=job.metadata, submission_id=submission_id)
