"""Static checks of the Dockerfile (no Docker engine here): hadolint, COPY sources, the
entrypoint, .dockerignore, no baked-in secrets, the pinned Ray."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.fixtures.cli import REPO

DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.strip().startswith("#")]


def ignored(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path.split("/")[0], pat)
               for pat in dockerignore())


def test_hadolint_is_clean():
    proc = subprocess.run([str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def copies() -> list[tuple[list[str], str]]:
    result = []
    for word, args in instructions():
        if word in ("COPY", "ADD"):
            parts = [p for p in args.split() if not p.startswith("--")]
            result.append((parts[:-1], parts[-1]))
    return result


def test_every_copy_source_exists_and_is_in_the_build_context():
    assert copies(), "the Dockerfile copies nothing from the repo"
    for sources, _dest in copies():
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: no such file in the repo"
            assert not ignored(src), f"COPY {src}: excluded by .dockerignore"


def test_entrypoint_is_the_executable_bootstrap_script_copied_from_infra():
    entry = [json.loads(args) for word, args in instructions() if word == "ENTRYPOINT"]
    assert len(entry) == 1, "exactly one ENTRYPOINT, in exec form"
    script = entry[0][-1]
    assert script.endswith("/infra/bootstrap.sh")
    # The path it names is where `COPY infra ./infra` puts the repo's script.
    workdir = None
    destinations = {}
    for word, args in instructions():
        if word == "WORKDIR":
            workdir = args
        if word == "COPY":
            *srcs, dest = [p for p in args.split() if not p.startswith("--")]
            for src in srcs:
                destinations[src.rstrip("/")] = os.path.normpath(os.path.join(workdir or "/", dest))
    assert destinations.get("infra") == os.path.dirname(script)
    local = REPO / "infra" / "bootstrap.sh"
    assert os.access(local, os.X_OK), "infra/bootstrap.sh must be executable"
    assert local.read_text().startswith("#!/usr/bin/env bash")
    assert subprocess.run(["bash", "-n", str(local)]).returncode == 0


def test_dockerignore_keeps_runs_data_and_venv_out():
    for path in (".venv", "runs", "data", ".git", "demo"):
        assert ignored(path), f".dockerignore must exclude {path}"
    for needed in ("pipeline", "infra", "runpod", "pyproject.toml"):
        assert not ignored(needed)


def test_no_secret_looking_env_or_arg():
    secretish = re.compile(r"(KEY|SECRET|TOKEN|PASSW|CREDENTIAL)", re.I)
    for word, args in instructions():
        if word in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            bad = [n for n in names if secretish.search(n)]
            assert not bad, f"{word} {bad}: secrets come from the pod's environment, not the image"


def test_cuda_runtime_base_pinned_ray_and_non_root_user():
    text = DOCKERFILE.read_text()
    base = re.search(r"ARG CUDA_IMAGE=(\S+)", text).group(1)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-(cudnn-)?runtime-ubuntu2[24]\.04", base), base
    pinned = re.search(r'"ray\[default,train\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f"ray.__version__ == '{pinned}'" in text, "the image must check it got the pinned Ray"
    users = [args for word, args in instructions() if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
