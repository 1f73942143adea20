"""The RunPod API, through the runpod SDK (pinned 1.12.0) where it has the call.

SDK 1.12.0 talks GraphQL (`$RUNPOD_API_BASE_URL/graphql`, default https://api.runpod.io) and
covers single pods: create_pod, get_pod, terminate_pod. It has no Instant Cluster calls, so
clusters use RunPod's documented REST v2 endpoints (`/v2/clusters`) on the same base URL with
the same bearer header and the same `requests` library the SDK uses.

The API key comes only from RUNPOD_API_KEY; a key in ~/.runpod/config.toml is ignored on purpose
so a run never silently uses an account the environment did not name.
"""

from __future__ import annotations

import os

from pipeline.errors import UserError

DEFAULT_BASE_URL = "https://api.runpod.io"
TIMEOUT_S = 30


def api_key_from_env() -> str:
    key = os.environ.get("RUNPOD_API_KEY", "").strip()
    if not key:
        raise UserError("RUNPOD_API_KEY is not set",
                        hint="create a key at https://www.runpod.io/console/user/settings and export it")
    return key


def base_url() -> str:
    return os.environ.get("RUNPOD_API_BASE_URL", DEFAULT_BASE_URL).rstrip("/")


class RunPodAPI:
    """Thin wrapper: SDK calls for pods, REST v2 for clusters, every failure a `UserError`."""

    def __init__(self, api_key: str | None = None):
        import runpod

        self._key = api_key or api_key_from_env()
        self._sdk = runpod
        runpod.api_key = self._key  # the SDK's module-level key; never read from its config file

    # -- pods (SDK) --------------------------------------------------------------------------
    def create_pod(self, request: dict) -> dict:
        try:
            return self._call(self._sdk.create_pod, **request)
        except ValueError as exc:  # the SDK's own check of the GPU type id
            raise UserError(f"--gpu-type {request.get('gpu_type_id')!r}: {exc}") from None

    def get_pod(self, pod_id: str) -> dict | None:
        return self._call(self._sdk.get_pod, pod_id)

    def terminate_pod(self, pod_id: str) -> None:
        self._call(self._sdk.terminate_pod, pod_id)

    # -- Instant Clusters (REST v2; not in the SDK) --------------------------------------------
    def create_cluster(self, body: dict) -> dict:
        return self._rest("POST", "/v2/clusters", json=body)

    def get_cluster(self, cluster_id: str) -> dict | None:
        return self._rest("GET", f"/v2/clusters/{cluster_id}", missing_ok=True)

    def cluster_pods(self, cluster_id: str) -> list[dict]:
        return self._rest("GET", f"/v2/clusters/{cluster_id}/pods", missing_ok=True) or []

    def delete_cluster(self, cluster_id: str) -> None:
        self._rest("DELETE", f"/v2/clusters/{cluster_id}", missing_ok=True)

    # -- plumbing ------------------------------------------------------------------------------
    def _call(self, fn, *args, **kwargs):
        import requests
        from runpod import error as rp_error

        try:
            return fn(*args, **kwargs)
        except rp_error.AuthenticationError:
            raise UserError("RunPod rejected the API key in RUNPOD_API_KEY (401 Unauthorized)",
                            hint="check the key and its permissions") from None
        except rp_error.QueryError as exc:
            raise UserError(f"RunPod API error: {exc}") from None
        except requests.RequestException as exc:
            raise UserError(f"cannot reach the RunPod API at {base_url()}: {type(exc).__name__}") from None

    def _rest(self, method: str, path: str, json: dict | None = None, missing_ok: bool = False):
        import requests
        from runpod.user_agent import USER_AGENT

        url = base_url() + path
        headers = {"Authorization": f"Bearer {self._key}", "User-Agent": USER_AGENT,
                   "Content-Type": "application/json"}
        try:
            resp = requests.request(method, url, headers=headers, json=json, timeout=TIMEOUT_S)
        except requests.RequestException as exc:
            raise UserError(f"cannot reach the RunPod API at {base_url()}: {type(exc).__name__}") from None
        if resp.status_code == 404 and missing_ok:
            return None
        if resp.status_code in (401, 403):
            raise UserError(f"RunPod rejected the API key in RUNPOD_API_KEY ({resp.status_code} on {method} {path})")
        if resp.status_code >= 400:
            raise UserError(f"RunPod API error on {method} {path}: {resp.status_code} {_error_text(resp)}")
        return resp.json() if resp.content else None


def _error_text(resp) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    return str(body.get("error") or body.get("message") or body)[:300]


def render_pod_request(request: dict) -> str:
    """The exact GraphQL request `create_pod` sends (the SDK's own mutation builder), unmasked."""
    import json as _json

    from runpod.api.mutations.pods import generate_pod_deployment_mutation

    r = dict(request)
    if r.get("container_disk_in_gb") is None and r.get("template_id") is None:
        r["container_disk_in_gb"] = 10  # the SDK's default, applied the same way
    mutation = generate_pod_deployment_mutation(
        r["name"], r.get("image_name", ""), r.get("gpu_type_id"), r.get("cloud_type", "ALL"),
        r.get("support_public_ip", True), r.get("start_ssh", True), r.get("data_center_id"),
        r.get("country_code"), r.get("gpu_count", 1) if r.get("gpu_type_id") else None,
        r.get("volume_in_gb", 0), r.get("container_disk_in_gb"), r.get("min_vcpu_count", 1),
        r.get("min_memory_in_gb", 1), r.get("docker_args", ""), r.get("ports"),
        r.get("volume_mount_path", "/runpod-volume"), r.get("env"), r.get("template_id"),
        r.get("network_volume_id"), r.get("allowed_cuda_versions"))
    body = _json.dumps({"query": mutation})
    return (f"POST {base_url()}/graphql\nAuthorization: Bearer ****\n"
            f"Content-Type: application/json\n\n{body}\n\n"
            f"(GraphQL query, readable:){mutation}")


def render_cluster_request(body: dict) -> str:
    import json as _json

    return (f"POST {base_url()}/v2/clusters\nAuthorization: Bearer ****\n"
            f"Content-Type: application/json\n\n{_json.dumps(body, indent=2)}")
