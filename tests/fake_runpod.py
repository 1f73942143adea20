"""FAKE: a loopback stand-in for the RunPod API endpoints the runpod SDK (1.12.0) and our REST
calls use. This is the only fake in the project: RunPod cannot be reached from tests and costs
money. Everything else in the tests (Ray, S3, the CLI) is real.

It serves, on 127.0.0.1:
- POST /graphql: the SDK's queries and mutations (gpuTypes, myself, pod, podFindAndDeployOnDemand,
  podTerminate), parsed from the query text the SDK builds;
- /v2/clusters (POST, GET /{id}, GET /{id}/pods, DELETE /{id}): Instant Clusters, REST v2.

Pods start as RUNNING without a `runtime` and get one after `polls_until_running` reads, the way
real pods report a container that is still starting. Every request is kept in `requests` (with the
Authorization header reduced to whether it matched) so tests can check bodies against templates.
Point the SDK at it with RUNPOD_API_BASE_URL=fake.url.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GPU_TYPES = {
    "NVIDIA GeForce RTX 4090": 24,
    "NVIDIA H100 80GB HBM3": 80,
}

_FIELD = re.compile(r'(\w+):\s*("(?:[^"\\]|\\.)*"|\[[^\]]*\]|[^,\s}]+)')
_ENV_ITEM = re.compile(r'\{\s*key:\s*"([^"]*)",\s*value:\s*"([^"]*)"\s*\}')


def parse_input(query: str) -> dict:
    """The `input: { ... }` fields of an SDK GraphQL mutation/query as Python values."""
    match = re.search(r"input:\s*\{(.*)\}\s*\)", query, re.S)
    if not match:
        return {}
    text = match.group(1)
    fields = {}
    env_match = re.search(r"env:\s*\[(.*?)\]", text, re.S)
    if env_match:
        fields["env"] = dict(_ENV_ITEM.findall(env_match.group(1)))
        text = text[:env_match.start()] + text[env_match.end():]
    for key, raw in _FIELD.findall(text):
        if raw.startswith('"'):
            fields[key] = json.loads(raw)
        elif raw.startswith("["):
            fields[key] = json.loads(raw)
        elif raw in ("true", "false"):
            fields[key] = raw == "true"
        elif raw == "null":
            fields[key] = None
        else:
            fields[key] = int(raw) if raw.lstrip("-").isdigit() else raw
    return fields


@dataclass
class Recorded:
    method: str
    path: str
    authorized: bool
    body: dict | None
    raw: str = ""


@dataclass
class FakeRunPod:
    api_key: str = field(default_factory=lambda: "rpa_" + secrets.token_hex(16))
    polls_until_running: int = 2
    requests: list[Recorded] = field(default_factory=list)
    pods: dict[str, dict] = field(default_factory=dict)
    clusters: dict[str, dict] = field(default_factory=dict)
    graphql_error: str | None = None  # next GraphQL call answers {"errors": [...]}
    rest_error: tuple[int, str] | None = None  # next REST call answers this status and message

    def start(self) -> "FakeRunPod":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode() if length else ""
                body = json.loads(raw) if raw else None
                authorized = self.headers.get("Authorization") == f"Bearer {fake.api_key}"
                fake.requests.append(Recorded(method, self.path, authorized, body, raw))
                if not authorized:
                    return self._reply(401, {"error": "Unauthorized"})
                if self.path == "/graphql" and method == "POST":
                    return self._reply(*fake.graphql(body["query"]))
                if self.path.startswith("/v2/clusters"):
                    return self._reply(*fake.rest(method, self.path, body))
                return self._reply(404, {"error": f"no route {method} {self.path}"})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_DELETE(self):
                self._handle("DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- GraphQL (the SDK) -----------------------------------------------------------------
    def graphql(self, query: str):
        if self.graphql_error:
            message, self.graphql_error = self.graphql_error, None
            return 200, {"errors": [{"message": message}]}
        fields = parse_input(query)
        if "podFindAndDeployOnDemand" in query:
            pod_id = "pod" + secrets.token_hex(5)
            self.pods[pod_id] = {"id": pod_id, "input": fields, "polls": 0, "terminated": False}
            return 200, {"data": {"podFindAndDeployOnDemand": {
                "id": pod_id, "imageName": fields.get("imageName"), "env": [],
                "machineId": "m1", "machine": {"podHostId": f"{pod_id}-host"}}}}
        if "podTerminate" in query:
            pod = self.pods.get(fields.get("podId"))
            if not pod or pod["terminated"]:
                return 200, {"errors": [{"message": "pod not found"}]}
            pod["terminated"] = True
            return 200, {"data": {"podTerminate": None}}
        if "gpuTypes" in query:
            wanted = fields.get("id")
            types = [{"id": g, "displayName": g, "memoryInGb": m, "maxGpuCount": 8}
                     for g, m in GPU_TYPES.items() if wanted in (None, g)]
            return 200, {"data": {"gpuTypes": types}}
        if "pod(input" in query:
            return 200, {"data": {"pod": self._pod_view(fields.get("podId"))}}
        if "myself" in query:
            return 200, {"data": {"myself": {"id": "user1", "pubKey": "", "networkVolumes": [],
                                              "pods": [self._pod_view(p) for p in self.pods
                                                       if not self.pods[p]["terminated"]]}}}
        return 200, {"errors": [{"message": "fake: unsupported query"}]}

    def _pod_view(self, pod_id):
        pod = self.pods.get(pod_id)
        if not pod or pod["terminated"]:
            return None
        pod["polls"] += 1
        started = pod["polls"] > self.polls_until_running
        inp = pod["input"]
        return {"id": pod_id, "name": inp.get("name"), "desiredStatus": "RUNNING",
                "imageName": inp.get("imageName"), "gpuCount": inp.get("gpuCount"),
                "runtime": {"ports": [{"privatePort": 8265, "type": "http"}]} if started else None}

    # -- REST v2 Instant Clusters ------------------------------------------------------------
    def rest(self, method: str, path: str, body):
        if self.rest_error:
            (status, message), self.rest_error = self.rest_error, None
            return status, {"error": message}
        parts = path.strip("/").split("/")  # v2, clusters, [id], [pods]
        if method == "POST" and len(parts) == 2:
            cid = "clu" + secrets.token_hex(5)
            n = body["compute"]["podCount"]
            self.clusters[cid] = {"id": cid, "body": body, "polls": 0, "deleted": False,
                                  "pods": [f"{cid}-node{i}" for i in range(n)]}
            return 201, {"id": cid, "name": body["name"], "podCount": n}
        cluster = self.clusters.get(parts[2]) if len(parts) > 2 else None
        if cluster is None or cluster["deleted"]:
            return 404, {"error": "cluster not found"}
        if method == "DELETE":
            cluster["deleted"] = True
            return 200, {"id": cluster["id"]}
        if len(parts) == 4 and parts[3] == "pods":
            cluster["polls"] += 1
            status = "RUNNING" if cluster["polls"] > self.polls_until_running else "STARTING"
            return 200, [{"id": pid, "status": status} for pid in cluster["pods"]]
        return 200, {"id": cluster["id"], "name": cluster["body"]["name"],
                     "podCount": len(cluster["pods"])}
