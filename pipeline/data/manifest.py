"""`manifest.json`: the table of contents of a shard set, and its integrity check.

A shard set is complete only once its manifest exists: `data shard` writes the manifest last,
after every shard is published under its final name. The manifest carries, per shard, its row
count, size, sha256 and row-group layout, so a reader can plan an epoch without opening every
file, and `load_manifest(uri, verify=True)` refuses a shard that was truncated or changed. A
shard set with cross-validation folds also carries their layout (`folds`, pipeline/data/folds.py).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from pipeline import storage
from pipeline.data import folds
from pipeline.data.schema import WINDOWS_FILE
from pipeline.errors import UserError

SCHEMA_VERSION = 1
WINDOW = 105
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")
REQUIRED_KEYS = ("schema_version", "features", "window", "shards", "splits")
REQUIRED_SHARD_KEYS = ("path", "split", "rows", "bytes", "sha256", "row_group_rows")
HASH_CHUNK = 8 << 20

# (manifest uri, shard path, sha256) already verified by this process: a loader per rank and per
# split would otherwise re-hash gigabytes on every construction.
_verified: set[tuple[str, str, str]] = set()
_verified_lock = threading.Lock()


def manifest_uri(dataset_uri: str) -> str:
    return storage.join(dataset_uri, MANIFEST_NAME)


def shard_uri(dataset_uri: str, shard: dict) -> str:
    return storage.join(dataset_uri, shard["path"])


def sha256_of(uri: str) -> str:
    """sha256 of a local or S3 object, streamed in chunks (never the whole file in memory)."""
    fs, path = storage.resolve(uri)
    digest = hashlib.sha256()
    with storage.user_errors(uri):
        with fs.open_input_stream(path) as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def load_manifest(uri: str, verify: bool = True, splits: tuple[str, ...] | None = None,
                  flag: str | None = None) -> dict:
    """Read and check `URI/manifest.json`; with `verify`, also check each shard's size and sha256.

    `splits` limits verification to the shards of those splits (a val loader need not hash the
    training shards). Any problem is a `UserError` that names the file (and `flag`, the option
    the URI came from, when given).
    """
    uri = str(uri).rstrip("/") if storage.is_s3(uri) else str(uri)
    check_shard_dir(uri, flag)
    m_uri = manifest_uri(uri)
    manifest = storage.read_json(m_uri)
    check_manifest(manifest, m_uri)
    if verify:
        for shard in manifest["shards"]:
            if splits is None or shard["split"] in splits:
                verify_shard(uri, shard)
    return manifest


BUILD_HINT = ("build one with `moola-pipeline data build --out SHARDS` (synthetic, or "
              "--source bars|moola --in FILE), or shard a windows data set with "
              "`moola-pipeline data shard --in WINDOWS --out SHARDS`")


def check_shard_dir(uri: str, flag: str | None = None) -> None:
    """Refuse, with what to run instead, a URI that is not a complete shard set: a missing path,
    a file (a bars CSV given to --data), a windows data set that was never sharded, or a shard
    run that did not finish. `flag` (`--data`) names where the URI came from."""
    where = f"{flag} {uri}" if flag else uri
    if storage.is_s3(uri):
        storage.check_bucket(uri)
    info = storage.file_info(uri)
    if info.type == storage.pafs.FileType.NotFound:
        raise UserError(f"{where}: not found, so no shard set here; {BUILD_HINT}")
    if info.type == storage.pafs.FileType.File:
        raise UserError(f"{where}: a file, not a shard directory (a directory with "
                        f"{MANIFEST_NAME}); {_from_file_hint(uri)}")
    if storage.exists(manifest_uri(uri)):
        return
    if storage.exists(storage.join(uri, WINDOWS_FILE)):
        raise UserError(f"{where}: a windows data set (the output of `data ingest` or `data "
                        f"synth`), not shards: shard it first with `moola-pipeline data shard "
                        f"--in {uri} --out SHARDS`, then use SHARDS"
                        + (f" as {flag}" if flag else ""))
    if storage.listdir(uri):
        raise UserError(f"{manifest_uri(uri)}: missing, so {where} is not a complete shard set "
                        f"(a shard run that did not finish, or not a shard directory); run "
                        f"`moola-pipeline data shard` again, or {BUILD_HINT}")
    raise UserError(f"{where}: an empty directory, so no shard set here (no {MANIFEST_NAME}); "
                    f"{BUILD_HINT}")


def _from_file_hint(uri: str) -> str:
    """What turns this file into shards."""
    name = storage.basename(uri)
    if name == WINDOWS_FILE:
        return (f"it belongs to a windows data set; shard that with `moola-pipeline data shard "
                f"--in {storage.parent(uri)} --out SHARDS`")
    if name == MANIFEST_NAME:
        return f"pass the directory that holds it, {storage.parent(uri)}"
    if name.lower().endswith((".csv", ".csv.gz", ".txt")):
        return (f"build shards from it with `moola-pipeline data build --source bars --in {uri} "
                f"--out SHARDS` (add --labels LABELS.csv for labeled windows)")
    return (f"build shards from it with `moola-pipeline data build --source moola --in {uri} "
            f"--out SHARDS` (moola's labeled Parquet; --source bars for a bar series)")


def check_manifest(manifest: Any, m_uri: str) -> None:
    """The manifest's own structure: keys, version, consistent counts."""
    if not isinstance(manifest, dict):
        raise UserError(f"{m_uri}: not a shard manifest (expected a JSON object)")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise UserError(f"{m_uri}: missing keys {missing}; rebuild with `moola-pipeline data shard`")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise UserError(f"{m_uri}: schema_version {manifest['schema_version']!r} is not supported "
                        f"(this version reads {SCHEMA_VERSION}); rebuild the shards")
    if manifest["window"] != WINDOW:
        raise UserError(f"{m_uri}: window {manifest['window']} is not {WINDOW}")
    rows_per_split: dict[str, int] = {}
    for i, shard in enumerate(manifest["shards"]):
        absent = [k for k in REQUIRED_SHARD_KEYS if k not in shard]
        if absent:
            raise UserError(f"{m_uri}: shard entry {i} lacks {absent}")
        if sum(shard["row_group_rows"]) != shard["rows"]:
            raise UserError(f"{m_uri}: shard {shard['path']} row groups do not add up to its rows")
        rows_per_split[shard["split"]] = rows_per_split.get(shard["split"], 0) + shard["rows"]
    for split, n in manifest["splits"].items():
        if rows_per_split.get(split, 0) != n:
            raise UserError(f"{m_uri}: split {split!r} counts {n} rows but its shards hold "
                            f"{rows_per_split.get(split, 0)}")
    if folds.FOLDS_KEY in manifest:  # its structure; `data validate` checks it against the rows
        folds.check_structure(manifest[folds.FOLDS_KEY], m_uri, manifest["splits"])


def verify_shard(dataset_uri: str, shard: dict) -> None:
    """Size, then sha256, of one shard against the manifest (cached per process once good)."""
    uri = shard_uri(dataset_uri, shard)
    key = (manifest_uri(dataset_uri), shard["path"], shard["sha256"])
    with _verified_lock:
        if key in _verified:
            return
    info = storage.file_info(uri)
    if info.type == storage.pafs.FileType.NotFound:
        raise UserError(f"{uri}: listed in {MANIFEST_NAME} but missing; the shard set is "
                        f"incomplete: rebuild it with `moola-pipeline data shard`")
    if info.size != shard["bytes"]:
        raise UserError(f"{uri}: {info.size} bytes but {MANIFEST_NAME} says {shard['bytes']} "
                        f"(truncated or changed); rebuild with `moola-pipeline data shard`")
    actual = sha256_of(uri)
    if actual != shard["sha256"]:
        raise UserError(f"{uri}: sha256 {actual[:12]}... does not match {MANIFEST_NAME} "
                        f"({shard['sha256'][:12]}...); the shard is corrupt or was changed: "
                        f"rebuild with `moola-pipeline data shard`")
    with _verified_lock:
        _verified.add(key)


def split_shards(manifest: dict, split: str, m_uri: str = MANIFEST_NAME) -> list[dict]:
    """The shards of one split in index order; a UserError if the split is absent or empty."""
    shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards or manifest["splits"].get(split, 0) == 0:
        present = sorted(k for k, v in manifest["splits"].items() if v)
        raise UserError(f"{m_uri}: split {split!r} has no rows (present: {present})")
    return shards
