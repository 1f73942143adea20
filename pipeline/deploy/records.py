"""What `runpod up` created, so `runpod down` can tear down exactly that.

A small JSON file of resource ids, kinds, names and addresses (no secrets). It is written right
after each create call returns, before waiting for readiness, so an interrupted `up` still
leaves a record `down` can act on. Default location: $MOOLA_RUNPOD_RECORD, else
$XDG_CONFIG_HOME/moola-pipeline/runpod-resources.json (~/.config/...).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import UserError


@dataclass
class Resource:
    kind: str  # "pod" or "cluster"
    id: str
    name: str
    gpu_type: str
    gpus: int
    nodes: int = 1
    address: str | None = None  # the Ray job server URL for `submit`, once known
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


def default_path() -> Path:
    if os.environ.get("MOOLA_RUNPOD_RECORD"):
        return Path(os.environ["MOOLA_RUNPOD_RECORD"])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "moola-pipeline" / "runpod-resources.json"


def load(path: Path) -> list[Resource]:
    if not path.exists():
        return []
    try:
        items = json.loads(path.read_text())["resources"]
        return [Resource(**item) for item in items]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a moola RunPod record file ({exc})",
                        hint="inspect it, or pass --record PATH") from None


def save(path: Path, resources: list[Resource]) -> None:
    """Atomic replace; the file is removed when nothing is left to tear down."""
    if not resources:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"resources": [asdict(r) for r in resources]}, indent=2) + "\n")
    os.replace(tmp, path)


def add(path: Path, resource: Resource) -> None:
    save(path, [r for r in load(path) if r.id != resource.id] + [resource])


def remove(path: Path, resource_id: str) -> None:
    save(path, [r for r in load(path) if r.id != resource_id])
