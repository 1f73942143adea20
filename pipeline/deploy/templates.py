"""Pod and Instant Cluster templates (`runpod/*.json`) turned into concrete API requests.

The templates hold everything that is not per-launch (image, disk, ports, plain env); `runpod up`
adds the name, GPU type and counts, and the secrets, which come only from this process's
environment and are masked whenever a request is shown.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
from pathlib import Path

from pipeline.errors import UserError

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "runpod"
TEMPLATES = {"pod": "pod.json", "cluster": "cluster.json"}

# Forwarded to the pods so the cluster can authenticate Ray and reach S3; masked in any output.
SECRET_ENV = ("RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Forwarded as is when set: not secret, but the run needs the same values as the laptop.
PLAIN_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION")
MASK = "****"


def load_template(kind: str, path: str | os.PathLike | None = None) -> dict:
    """The JSON template for `kind` ("pod" or "cluster"), from `path` or `runpod/`."""
    path = Path(path) if path else TEMPLATE_DIR / TEMPLATES[kind]
    try:
        template = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: template not found", hint="pass --template PATH") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    template.pop("description", None)
    return template


def pod_env(template_env: dict, environ: dict | None = None) -> dict[str, str]:
    """Template env plus the Ray token and S3 settings from the environment."""
    environ = os.environ if environ is None else environ
    if not environ.get("RAY_AUTH_TOKEN"):
        raise UserError(
            "RAY_AUTH_TOKEN is not set: the cluster's Ray head requires token auth",
            hint="export RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')")
    env = {k: str(v) for k, v in (template_env or {}).items()}
    for key in SECRET_ENV + PLAIN_ENV:
        if environ.get(key):
            env[key] = environ[key]
    return env


def launch_name(template: dict) -> str:
    return f"{template.get('name_prefix', 'moola')}-{secrets.token_hex(3)}"


def pod_request(template: dict, *, name: str, gpus: int, gpu_type: str, image: str | None,
                volume: tuple[str, str | None] | None, env: dict[str, str]) -> dict:
    """Keyword arguments for `runpod.create_pod` (SDK 1.12.0)."""
    kwargs = {k: v for k, v in copy.deepcopy(template).items() if k != "name_prefix"}
    kwargs.update(name=name, gpu_type_id=gpu_type, gpu_count=gpus, env=env)
    if image:
        kwargs["image_name"] = image
    if volume:
        kwargs["network_volume_id"] = volume[0]
        if volume[1]:
            kwargs["volume_mount_path"] = volume[1]
    return kwargs


def cluster_request(template: dict, *, name: str, nodes: int, gpus: int, gpu_type: str,
                    image: str | None, volume: tuple[str, str | None] | None,
                    env: dict[str, str]) -> dict:
    """JSON body for REST v2 `POST /v2/clusters` (Instant Cluster)."""
    body = {k: v for k, v in copy.deepcopy(template).items() if k != "name_prefix"}
    body["name"] = name
    body["compute"] = {**body.get("compute", {}), "gpuTypeId": gpu_type, "podCount": nodes,
                       "gpuCountPerPod": gpus}
    body["env"] = env
    if image:
        body["image"] = image
    if volume:
        body["mounts"] = {"network": {"networkVolumeId": volume[0],
                                      "mountPath": volume[1] or "/workspace"}}
    return body


def mask_secrets(text: str, environ: dict | None = None) -> str:
    """`text` with every secret value from the environment (and the API key) replaced by ****."""
    environ = os.environ if environ is None else environ
    for key in SECRET_ENV + ("RUNPOD_API_KEY",):
        value = environ.get(key)
        if value:
            text = text.replace(value, MASK)
    return text
