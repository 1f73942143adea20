"""URIs to pyarrow filesystems: local paths and `s3://bucket/prefix`, atomic writes, clear errors.

Everything that reads or writes a dataset, a run directory or a checkpoint goes through here, so
local paths and S3 behave the same. S3 settings come only from the standard AWS environment
variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, `AWS_REGION`); nothing here stores or prints them.

Atomic writes: a local file is written beside its target under a temporary name and renamed
(`os.replace` is atomic on one filesystem); an S3 object is assembled completely in memory or in a
local temporary file first and then sent, and S3 makes an object visible only once its upload
completes. A reader therefore sees the old object or the new one, never half of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import uuid
from functools import lru_cache
from typing import Any, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.errors import UserError

S3_SCHEME = "s3://"
# Bounded retries for transient S3 errors (throttling, dropped connections); timeouts keep an
# unreachable endpoint from hanging a command for minutes.
S3_MAX_ATTEMPTS = int(os.environ.get("MOOLA_S3_MAX_ATTEMPTS", "4"))
S3_CONNECT_TIMEOUT_S = float(os.environ.get("MOOLA_S3_CONNECT_TIMEOUT_S", "5"))
S3_REQUEST_TIMEOUT_S = float(os.environ.get("MOOLA_S3_REQUEST_TIMEOUT_S", "60"))


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEME)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the environment (cached per settings, never per secret)."""
    env = os.environ
    return _s3_filesystem(
        s3_endpoint(), env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"),
        env.get("AWS_SESSION_TOKEN"),
    )


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint, region, access_key, secret_key, session_token) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = dict(
        region=region,
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        request_timeout=S3_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        allow_bucket_creation=True,
    )
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=session_token)
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "http")
    return pafs.S3FileSystem(**kwargs)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key/part` -> ("bucket", "key/part"); refuses a URI without a bucket."""
    rest = str(uri)[len(S3_SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UserError(f"{uri}: an S3 URI needs a bucket, like s3://my-bucket/prefix")
    return bucket, key.strip("/")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A URI (local path or s3://bucket/prefix) -> (pyarrow filesystem, path inside it)."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_filesystem(), posixpath.join(bucket, key) if key else bucket
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise UserError(f"{uri}: unsupported scheme {scheme!r}; use a local path or s3://bucket/prefix")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def basename(uri: str) -> str:
    return posixpath.basename(str(uri).rstrip("/"))


def parent(uri: str) -> str:
    uri = str(uri).rstrip("/")
    if is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(uri))


def _describe_os_error(uri: str, exc: BaseException) -> str:
    text = str(exc)
    low = text.lower()
    squashed = low.replace("_", "").replace(" ", "")  # ACCESS_DENIED, AccessDenied, ...

    if isinstance(exc, FileNotFoundError) or "path does not exist" in low or "no such file" in low:
        return f"{uri}: not found"
    if isinstance(exc, PermissionError) and not is_s3(uri):
        return f"{uri}: permission denied"
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and not is_s3(uri):
        return f"{uri}: a file stands where a folder is needed on this path; choose another path"
    if is_s3(uri):
        endpoint = s3_endpoint() or "the default AWS endpoint"
        if any(m in squashed for m in ("accessdenied", "invalidaccesskeyid", "forbidden",
                                       "signaturedoesnotmatch", "403")):
            return (f"{uri}: access denied by {endpoint}; check AWS_ACCESS_KEY_ID and "
                    f"AWS_SECRET_ACCESS_KEY")
        if "nosuchbucket" in squashed or "bucketdoesnotexist" in squashed:
            return f"{uri}: the bucket does not exist at {endpoint}"
        if "network" in low or "connect" in low or "timeout" in low or "curl" in low \
                or "resolve" in low:
            return (f"{uri}: cannot reach the S3 endpoint {endpoint}; check AWS_ENDPOINT_URL "
                    f"and that the server is running")
        return f"{uri}: S3 error: {text.splitlines()[0] if text else type(exc).__name__}"
    if "no space left" in low or getattr(exc, "errno", None) == 28:
        return f"{uri}: no space left on device"
    return f"{uri}: {text or type(exc).__name__}"


@contextlib.contextmanager
def user_errors(uri: str) -> Iterator[None]:
    """Turn filesystem and S3 failures on `uri` into one clear UserError naming it."""
    try:
        yield
    except UserError:
        raise
    except OSError as exc:  # pyarrow raises OSError (or subclasses) for I/O and S3 errors
        raise UserError(_describe_os_error(uri, exc)) from None


def file_info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    with user_errors(uri):
        return fs.get_file_info(path)


def exists(uri: str) -> bool:
    return file_info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return file_info(uri).type == pafs.FileType.Directory


def size(uri: str) -> int:
    info = file_info(uri)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{uri}: not found")
    return int(info.size)


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly under `uri`, sorted; [] when it does not exist."""
    fs, path = resolve(uri)
    with user_errors(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    with user_errors(uri):
        fs.create_dir(path, recursive=True)


def open_input(uri: str):
    """A random-access file (for pyarrow.parquet.ParquetFile and friends)."""
    fs, path = resolve(uri)
    with user_errors(uri):
        return fs.open_input_file(path)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with user_errors(uri):
        with fs.open_input_stream(path) as f:
            return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{uri}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write `data` so that readers see the old content or all of the new, never a part."""
    fs, path = resolve(uri)
    with user_errors(uri):
        if is_s3(uri):
            with fs.open_output_stream(path) as f:  # one object; visible once complete
                f.write(data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def write_json_atomic(uri: str, obj: Any) -> None:
    write_text_atomic(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def staged_file(uri: str, suffix: str = "") -> Iterator[str]:
    """A local path to write a (large) file to; published to `uri` atomically on success.

    Local: a temporary name beside the target, renamed at the end. S3: a local temporary file,
    uploaded once complete. On an exception nothing is published and the temporary is removed.
    """
    fs, path = resolve(uri)
    if is_s3(uri):
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="moola-stage-")
        os.close(fd)
    else:
        with user_errors(uri):  # a parent that is a file: one UserError, not a traceback
            os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        yield tmp
        with user_errors(uri):
            if is_s3(uri):
                pafs.copy_files(tmp, path, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=fs)
            else:
                os.replace(tmp, path)
    except OSError as exc:
        raise UserError(_describe_os_error(uri, exc)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def upload_file(local_path: str, uri: str) -> None:
    fs, path = resolve(uri)
    with user_errors(uri):
        pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)


def download_file(uri: str, local_path: str) -> None:
    fs, path = resolve(uri)
    with user_errors(uri):
        pafs.copy_files(path, local_path, source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())


def remove(uri: str) -> None:
    fs, path = resolve(uri)
    with user_errors(uri):
        fs.delete_file(path)


def remove_tree(uri: str) -> None:
    fs, path = resolve(uri)
    with user_errors(uri):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


def check_bucket(uri: str) -> None:
    """Fail early with a clear message when an s3:// URI's bucket is unreachable or denied."""
    if not is_s3(uri):
        return
    bucket, _ = split_s3(uri)
    fs = s3_filesystem()
    with user_errors(f"s3://{bucket}"):
        info = fs.get_file_info(bucket)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{uri}: the bucket {bucket!r} does not exist at "
                        f"{s3_endpoint() or 'the default AWS endpoint'}")
