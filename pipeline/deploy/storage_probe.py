"""Storage bootstrap: make sure a run's URI can be written before a long run starts.

`check_storage(uri)` creates the bucket (S3) or directory (local) when missing, then writes a
small probe object under the URI, reads it back, compares, and deletes it. Any failure is a
`UserError` naming the URI (bad credentials, unreachable endpoint, read-only bucket, ...).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from pipeline import storage
from pipeline.errors import UserError


@dataclass
class ProbeResult:
    uri: str
    created: str | None  # "bucket NAME" or "directory PATH" when we made it
    seconds: float


def ensure_location(uri: str) -> str | None:
    """Create the bucket or directory behind `uri` if it does not exist; say what was made."""
    if storage.is_s3(uri):
        bucket, _ = storage.split_s3(uri)
        bucket_uri = f"s3://{bucket}"
        if storage.exists(bucket_uri):
            return None
        storage.makedirs(bucket_uri)  # S3FileSystem(allow_bucket_creation=True): CreateBucket
        return f"bucket {bucket}"
    if storage.is_dir(uri):
        return None
    storage.makedirs(uri)
    return f"directory {storage.resolve(uri)[1]}"


def check_storage(uri: str) -> ProbeResult:
    start = time.monotonic()
    created = ensure_location(uri)
    probe = storage.join(uri, f".moola-probe-{secrets.token_hex(6)}")
    payload = secrets.token_bytes(1024)
    storage.write_bytes_atomic(probe, payload)
    try:
        if storage.read_bytes(probe) != payload:
            raise UserError(f"{uri}: the probe object read back differs from what was written")
    finally:
        storage.remove(probe)
    if storage.exists(probe):
        raise UserError(f"{uri}: the probe object {probe} is still there after delete")
    return ProbeResult(uri, created, time.monotonic() - start)
