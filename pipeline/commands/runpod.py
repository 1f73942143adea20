"""`moola-pipeline runpod up|status|down`: a RunPod pod or Instant Cluster running our image.

One pod (any number of GPUs) is a single-node Ray cluster; `--nodes M` > 1 needs an Instant
Cluster, whose nodes share a private network with all ports open. Plain pods reach each other
only through remapped public ports, and Ray needs many fixed ports, so that combination is
refused rather than tried. Secrets come only from the environment and are never printed.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from pipeline.errors import UserError


def _volume(value: str | None) -> tuple[str, str | None] | None:
    if not value:
        return None
    volume_id, _, mount = value.partition(":")
    if not volume_id or (mount and not mount.startswith("/")):
        raise UserError(f"--volume {value!r}: expected NETWORK_VOLUME_ID or NETWORK_VOLUME_ID:/mount/path")
    return volume_id, mount or None


def _record_path(record: str | None) -> Path:
    from pipeline.deploy import records

    return Path(record) if record else records.default_path()


record_option = click.option("--record", type=click.Path(dir_okay=False), default=None,
                             help="Record file of created resources (default: $MOOLA_RUNPOD_RECORD "
                                  "or ~/.config/moola-pipeline/runpod-resources.json).")


@click.group("runpod")
def runpod() -> None:
    """Bring a RunPod GPU pod or Instant Cluster up, check it, tear it down."""


@runpod.command("up")
@click.option("--gpus", type=click.IntRange(min=1), required=True, help="GPUs per node.")
@click.option("--gpu-type", required=True, help='RunPod GPU type id, e.g. "NVIDIA GeForce RTX 4090".')
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes; more than one needs an Instant Cluster.")
@click.option("--mode", type=click.Choice(["auto", "pod", "cluster"]), default="auto", show_default=True,
              help="auto: a pod for one node, an Instant Cluster for several.")
@click.option("--image", default=None, help="Container image (default: the template's).")
@click.option("--volume", default=None, metavar="ID[:/PATH]", help="Attach a network volume.")
@click.option("--template", type=click.Path(dir_okay=False), default=None,
              help="Template JSON (default: runpod/pod.json or runpod/cluster.json).")
@click.option("--dry-run", is_flag=True, help="Print the exact request (secrets masked) and stop.")
@click.option("--wait-timeout", type=click.FloatRange(min=0), default=1200.0, show_default=True,
              help="Seconds to wait for the Ray head to answer.")
@click.option("--no-wait", is_flag=True, help="Return after the create call.")
@record_option
def up(gpus, gpu_type, nodes, mode, image, volume, template, dry_run, wait_timeout, no_wait, record):
    """Create the pod/cluster, wait until its Ray head answers, print the address for `submit`."""
    from pipeline.deploy import records, templates
    from pipeline.deploy.runpod_api import (RunPodAPI, api_key_from_env, render_cluster_request,
                                            render_pod_request)

    if mode == "auto":
        mode = "cluster" if nodes > 1 else "pod"
    if mode == "pod" and nodes > 1:
        raise UserError(
            f"--nodes {nodes} with --mode pod: plain pods reach each other only through remapped "
            "public ports, and a multi-node Ray cluster needs many fixed ports between nodes",
            hint="use an Instant Cluster (--mode cluster), or one pod with more --gpus")
    volume = _volume(volume)
    tmpl = templates.load_template(mode, template)
    env = templates.pod_env(tmpl.get("env", {}))
    name = templates.launch_name(tmpl)
    if mode == "pod":
        request = templates.pod_request(tmpl, name=name, gpus=gpus, gpu_type=gpu_type, image=image,
                                        volume=volume, env=env)
        shown = render_pod_request(request)
    else:
        request = templates.cluster_request(tmpl, name=name, nodes=nodes, gpus=gpus,
                                            gpu_type=gpu_type, image=image, volume=volume, env=env)
        shown = render_cluster_request(request)
    if dry_run:
        click.echo(templates.mask_secrets(shown))
        return

    api = RunPodAPI(api_key_from_env())
    path = _record_path(record)
    if mode == "pod":
        created = api.create_pod(request)
    else:
        created = api.create_cluster(request)
    resource = records.Resource(kind=mode, id=created["id"], name=name, gpu_type=gpu_type,
                                gpus=gpus, nodes=nodes)
    records.add(path, resource)
    click.echo(f"created {mode} {resource.id} ({name}); recorded in {path}")
    if no_wait:
        click.echo("not waiting; `moola-pipeline runpod status` shows when it is ready")
        return
    resource.address = _wait_ready(api, resource, wait_timeout)
    records.add(path, resource)
    click.echo(f"ray head answering at {resource.address}")
    click.echo(f"submit with: moola-pipeline submit --address {resource.address} -- <train args>")


def _head_pod_id(api, resource) -> str | None:
    """The pod that runs the Ray head: the pod itself, or the cluster's node 0 once running."""
    from pipeline.deploy.readiness import pod_is_running

    if resource.kind == "pod":
        return resource.id if pod_is_running(api.get_pod(resource.id)) else None
    pods = api.cluster_pods(resource.id)
    if len(pods) < resource.nodes or not all(_rest_pod_running(p) for p in pods):
        return None
    # REST v2 lists a cluster's pods in node order; NODE_RANK 0 (the head) comes first.
    return pods[0]["id"]


def _rest_pod_running(pod: dict) -> bool:
    return (pod.get("status") or pod.get("desiredStatus")) == "RUNNING"


def _wait_ready(api, resource, timeout_s: float) -> str:
    import time

    from pipeline.deploy import readiness

    token = os.environ.get("RAY_AUTH_TOKEN", "")
    start = time.monotonic()
    pod_id = readiness.wait_until(lambda: _head_pod_id(api, resource),
                                  f"{resource.kind} {resource.id}", timeout_s,
                                  on_wait=_progress(f"waiting for {resource.kind} {resource.id} to run"))
    address = readiness.head_address(pod_id)
    remaining = max(0.0, timeout_s - (time.monotonic() - start))
    readiness.wait_until(lambda: readiness.probe_ray_head(address, token) is None,
                         f"Ray head at {address}", remaining,
                         on_wait=_progress(f"waiting for the Ray head at {address}"))
    return address


def _progress(message: str):
    def show(already_shown):
        if not already_shown:
            click.echo(message + " ...", err=True)
        return True
    return show


@runpod.command("status")
@record_option
def status(record):
    """Show what `up` created, its RunPod state and whether the Ray head answers."""
    from pipeline.deploy import readiness, records
    from pipeline.deploy.runpod_api import RunPodAPI, api_key_from_env

    path = _record_path(record)
    resources = records.load(path)
    if not resources:
        click.echo(f"nothing recorded in {path}")
        return
    api = RunPodAPI(api_key_from_env())
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    for r in resources:
        if r.kind == "pod":
            pod = api.get_pod(r.id)
            state = "gone" if pod is None else (pod.get("desiredStatus") or "?")
            if pod is not None and pod.get("desiredStatus") == "RUNNING" and pod.get("runtime") is None:
                state = "STARTING"
        else:
            cluster = api.get_cluster(r.id)
            pods = api.cluster_pods(r.id) if cluster else []
            running = sum(_rest_pod_running(p) for p in pods)
            state = "gone" if cluster is None else f"{running}/{r.nodes} nodes running"
        head = "-"
        if r.address and state != "gone" and not token:
            head = "unknown (RAY_AUTH_TOKEN not set)"
        elif r.address and state != "gone":
            reason = readiness.probe_ray_head(r.address, token)
            head = "answering" if reason is None else f"not answering: {reason}"
        click.echo(f"{r.kind} {r.id} {r.name}: {state}; {r.nodes} node(s) x {r.gpus} {r.gpu_type}; "
                   f"ray head: {head}" + (f" at {r.address}" if r.address else ""))


@runpod.command("down")
@click.option("--id", "only_id", default=None, help="Tear down only this recorded resource.")
@record_option
def down(only_id, record):
    """Terminate everything `up` created (as recorded), and forget it."""
    from pipeline.deploy import records
    from pipeline.deploy.runpod_api import RunPodAPI, api_key_from_env

    path = _record_path(record)
    resources = records.load(path)
    if only_id:
        resources = [r for r in resources if r.id == only_id]
        if not resources:
            raise UserError(f"--id {only_id}: not in {path}")
    if not resources:
        click.echo(f"nothing recorded in {path}; nothing to tear down")
        return
    api = RunPodAPI(api_key_from_env())
    for r in resources:
        if r.kind == "pod":
            if api.get_pod(r.id) is None:
                click.echo(f"pod {r.id} already gone")
            else:
                api.terminate_pod(r.id)
                click.echo(f"terminated pod {r.id} ({r.name})")
        else:
            api.delete_cluster(r.id)
            click.echo(f"deleted cluster {r.id} ({r.name}) and its pods")
        records.remove(path, r.id)
