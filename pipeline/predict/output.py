"""Staged writes and the publish step: a prediction is visible only once it is complete.

Both engines write every file under `OUT/_staging/<id>/` first (the Ray engine with Ray Data's
`write_parquet(mode=CREATE)` into that fresh prefix: never APPEND or OVERWRITE into OUT, see
next-anchors.md section 4 for the write bugs). Publishing then, in this order:
  1. withdraws OUT/manifest.json of an older prediction (from here OUT reads as incomplete),
  2. moves the staged files to OUT/windows/<id>-NNNNN.parquet and OUT/bars/<id>-NNNNN.parquet
     (a rename on a local disk; copy + delete on S3),
  3. writes OUT/manifest.json (atomic), which lists exactly the files of this prediction,
  4. removes the older prediction's files and the staging prefix.
A job killed before step 3 leaves no manifest, so readers (`read_predictions`, and anyone who
follows the rule "no manifest, no data") see nothing; its staging prefix holds only scratch.
"""

from __future__ import annotations

import datetime
import re
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UserError
from pipeline.predict.table import parquet_options

MANIFEST = "manifest.json"
STAGING = "_staging"
KIND = "moola.predictions"
SCHEMA_VERSION = 1
TABLES = ("windows", "bars")
ROWS_PER_FILE = 65536
ROW_GROUP_ROWS = 16384  # windows per row group (chunks arrive 1,024 at a time)
FILE_NAME = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{8}-\d{5}\.parquet$")


def check_out(out: str, in_uri: str, run: str) -> list[str]:
    """Refuse an OUT that would clobber something else, before any work is done; notes on
    leftovers of stopped jobs."""
    storage.check_bucket(out)

    def same(a: str, b: str) -> bool:
        return storage.resolve(a)[1].rstrip("/") == storage.resolve(b)[1].rstrip("/")
    for other, what in ((in_uri, "input"), (run, "run")):
        if same(out, other):
            raise UserError(f"--out {out}: that is the {what} directory; write the predictions "
                            f"to a directory of their own")
    if storage.file_info(out).type == storage.pafs.FileType.File:
        raise UserError(f"--out {out}: a file; give a directory for the predictions")
    old = storage.join(out, MANIFEST)
    if storage.exists(old) and storage.read_json(old).get("kind") != KIND:
        raise UserError(f"--out {out}: holds another kind of data ({MANIFEST} is not a "
                        f"prediction's); give a directory of its own")
    left = storage.listdir(storage.join(out, STAGING))
    if left:
        return [f"{storage.join(out, STAGING)} holds {len(left)} staging prefix"
                f"{'es' if len(left) > 1 else ''} of stopped jobs ({', '.join(left[:3])}"
                f"{' ...' if len(left) > 3 else ''}): scratch, safe to delete"]
    return []


class Staging:
    """OUT/_staging/<id>/: where a prediction is assembled before it is published."""

    def __init__(self, out: str):
        self.out = out
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.id = f"{stamp}-{uuid.uuid4().hex[:8]}"
        self.uri = storage.join(out, STAGING, self.id)

    def table_uri(self, table: str) -> str:
        return storage.join(self.uri, table)

    def writer(self, table: str, schema: pa.Schema) -> "RollingWriter":
        return RollingWriter(self.table_uri(table), schema)

    def staged_files(self, table: str) -> list[str]:
        return [n for n in storage.listdir(self.table_uri(table)) if n.endswith(".parquet")]

    def publish(self, manifest: dict) -> dict:
        """Steps 2-4 above after step 1; returns the manifest as written."""
        old_manifest = storage.join(self.out, MANIFEST)
        if storage.exists(old_manifest):
            storage.remove(old_manifest)
        files = []
        for table in TABLES:
            for k, name in enumerate(sorted(self.staged_files(table))):
                src = storage.join(self.table_uri(table), name)
                rel = f"{table}/{self.id}-{k:05d}.parquet"
                dst = storage.join(self.out, *rel.split("/"))
                rows = pq.ParquetFile(storage.open_input(src)).metadata.num_rows
                _move(src, dst)
                files.append({"path": rel, "table": table, "rows": rows,
                              "bytes": storage.size(dst)})
        manifest = {**manifest, "kind": KIND, "schema_version": SCHEMA_VERSION, "id": self.id,
                    "files": files, "rows": {t: sum(f["rows"] for f in files if f["table"] == t)
                                             for t in TABLES}}
        storage.write_json_atomic(old_manifest, manifest)
        listed = {f["path"] for f in files}
        for table in TABLES:
            for name in storage.listdir(storage.join(self.out, table)):
                if FILE_NAME.match(name) and f"{table}/{name}" not in listed:
                    storage.remove(storage.join(self.out, table, name))
        self.abort()
        return manifest

    def abort(self) -> None:
        """Drop the staging prefix (and the _staging folder once empty)."""
        try:
            storage.remove_tree(self.uri)
            parent = storage.join(self.out, STAGING)
            if not storage.is_s3(parent) and storage.exists(parent) and not storage.listdir(parent):
                storage.remove_tree(parent)
        except UserError:
            pass  # scratch only: a reader never looks there


def _move(src: str, dst: str) -> None:
    fs, src_path = storage.resolve(src)
    _, dst_path = storage.resolve(dst)
    with storage.user_errors(dst):
        fs.create_dir(dst_path.rsplit("/", 1)[0], recursive=True)
        fs.move(src_path, dst_path)


class RollingWriter:
    """Window tables into staged Parquet files of at most ROWS_PER_FILE rows (the local
    engine's writer; the Ray engine uses Ray Data's)."""

    def __init__(self, uri: str, schema: pa.Schema, rows_per_file: int = ROWS_PER_FILE):
        self.uri, self.schema, self.rows_per_file = uri, schema, rows_per_file
        self._stage = self._writer = None
        self._rows = 0
        self._files = 0
        self._pending: list[pa.Table] = []

    def write(self, table: pa.Table) -> None:
        """Buffer up to a row group, then write it (a file rolls over at rows_per_file)."""
        self._pending.append(table)
        if sum(t.num_rows for t in self._pending) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        table = pa.concat_tables(self._pending) if self._pending else None
        self._pending = []
        while table is not None and table.num_rows:
            if self._writer is None:
                self._open()
            take = min(table.num_rows, self.rows_per_file - self._rows)
            self._writer.write_table(table.slice(0, take), row_group_size=ROW_GROUP_ROWS)
            self._rows += take
            table = table.slice(take)
            if self._rows >= self.rows_per_file:
                self._close()

    def close(self) -> None:
        self._flush()
        self._close()

    def _open(self) -> None:
        import contextlib
        self._stage = contextlib.ExitStack()
        path = self._stage.enter_context(
            storage.staged_file(storage.join(self.uri, f"part-{self._files:05d}.parquet")))
        self._writer = pq.ParquetWriter(path, self.schema, **parquet_options(self.schema))
        self._rows = 0

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stage.close()  # publish into the staging prefix (rename or upload)
            self._writer = self._stage = None
            self._files += 1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            self._writer.close()
            self._stage.__exit__(exc_type, *rest)
            self._writer = self._stage = None


def read_predictions(out: str, table: str = "windows") -> pa.Table:
    """A published prediction's table (its manifest's files); a UserError when incomplete."""
    m_uri = storage.join(out, MANIFEST)
    if not storage.exists(m_uri):
        raise UserError(f"{out}: no {MANIFEST}, so no complete prediction here (a prediction "
                        f"that is still running or was stopped publishes nothing)")
    manifest = storage.read_json(m_uri)
    parts = [pq.read_table(storage.open_input(storage.join(out, *f["path"].split("/"))))
             for f in manifest["files"] if f["table"] == table]
    return pa.concat_tables(parts) if parts else pa.table({})
