"""One storage layer for local paths and ``s3://bucket/key`` URIs (ingest, loader, DVC stages, flows).

Every function takes a URI: a local path (``data/shards``, ``/abs/path``, ``file:///abs/path``) or
``s3://bucket/prefix``. S3 goes through one boto3 client built from `ddcolor.config.EnvSettings`, so the endpoint
(``AWS_ENDPOINT_URL``: MinIO, moto, any S3-compatible store), credentials and region come from the environment.

Robustness:

* Writes are atomic: a local file is written to a temporary name in the same folder and renamed; an S3 object
  appears whole or not at all (PUT and multipart upload are atomic per object).
* S3 calls are retried: botocore's ``standard`` retry mode handles single requests, and every whole operation
  (e.g. a download including reading its body) is retried again with exponential backoff on connection errors,
  timeouts, throttling and 5xx answers, so a restarted server is survived. Attempts and the first delay come from
  ``DDCOLOR_STORAGE_RETRIES`` (default 6) and ``DDCOLOR_STORAGE_BACKOFF_S`` (default 1.0; doubled per retry, at most
  30 s), read at each call.
* Failures raise `StorageError` (`StorageNotFoundError` for a missing file/object) naming the URI and what to check.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

if TYPE_CHECKING:
    from botocore.client import BaseClient

__all__ = [
    "StorageError",
    "StorageNotFoundError",
    "delete",
    "download_file",
    "exists",
    "is_s3",
    "join",
    "list_files",
    "open_input_file",
    "read_bytes",
    "read_json",
    "s3_client",
    "size",
    "split_s3",
    "upload_file",
    "write_bytes",
    "write_json",
    "write_local_atomic",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRIES_ENV = "DDCOLOR_STORAGE_RETRIES"
BACKOFF_ENV = "DDCOLOR_STORAGE_BACKOFF_S"
DEFAULT_RETRIES = 6
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
BOTOCORE_MAX_ATTEMPTS = 3  # per request, inside each of our attempts
SINGLE_PUT_MAX_BYTES = 256 << 20  # larger uploads go multipart

_RETRYABLE_CODES = frozenset(
    {
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequestsException",
        "500",
        "502",
        "503",
        "504",
    }
)
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_AUTH_CODES = frozenset(
    {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)


class StorageError(Exception):
    """A storage operation failed. The message names the URI, the reason and what to check.

    Attributes:
        uri: the file, object or folder concerned.
        reason: what went wrong, in words.
    """

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = str(uri)
        self.reason = reason
        super().__init__(f"{self.uri}: {reason}")

    def __reduce__(self):  # picklable across worker processes despite the two-argument constructor
        return (type(self), (self.uri, self.reason))


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The file or object does not exist (also a `FileNotFoundError`)."""


# --- URIs ------------------------------------------------------------------------------------------------


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://...`` URIs."""
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (key without a leading slash; may be empty).

    Raises:
        StorageError: not an s3:// URI, or no bucket.
    """
    if not is_s3(uri):
        raise StorageError(uri, "not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(uri, "no bucket in the URI; expected s3://bucket/prefix")
    return bucket, key.lstrip("/")


def _local(uri: str | os.PathLike[str]) -> Path:
    text = str(uri)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """Join path components onto a URI: ``join("s3://b/p", "shards", "x.parquet") == "s3://b/p/shards/x.parquet"``."""
    text = str(uri)
    if is_s3(text):
        out = text.rstrip("/")
        for part in parts:
            part = str(part).strip("/")
            if part:
                out = f"{out}/{part}"
        return out
    return str(Path(_local(text), *map(str, parts)))


# --- S3 client and retries -------------------------------------------------------------------------------

_client_lock = threading.Lock()
_clients: dict[tuple[Any, ...], BaseClient] = {}


def _endpoint() -> str | None:
    from ddcolor.config import EnvSettings

    return EnvSettings.from_env().aws_endpoint_url


def s3_client() -> BaseClient:
    """The boto3 S3 client for the current environment (cached per process and per settings).

    Endpoint, credentials and region come from `EnvSettings` (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
    With a custom endpoint, checksums are only sent/validated when an operation requires them (what MinIO and
    other S3-compatible stores accept).
    """
    import boto3
    from botocore.config import Config

    from ddcolor.config import EnvSettings

    kwargs = EnvSettings.from_env().s3_client_kwargs()
    key = (os.getpid(), BOTOCORE_MAX_ATTEMPTS, tuple(sorted(kwargs.items())))
    with _client_lock:
        client = _clients.get(key)
        if client is None:
            options: dict[str, Any] = {
                "retries": {"max_attempts": BOTOCORE_MAX_ATTEMPTS, "mode": "standard"},
                "connect_timeout": 10,
                "read_timeout": 60,
            }
            if kwargs.get("endpoint_url"):
                options["request_checksum_calculation"] = "when_required"
                options["response_checksum_validation"] = "when_required"
            client = boto3.session.Session().client("s3", config=Config(**options), **kwargs)
            _clients[key] = client
    return client


def _retry_policy() -> tuple[int, float]:
    try:
        attempts = max(1, int(os.environ.get(RETRIES_ENV, DEFAULT_RETRIES)))
    except ValueError:
        attempts = DEFAULT_RETRIES
    try:
        backoff = max(0.0, float(os.environ.get(BACKOFF_ENV, DEFAULT_BACKOFF_S)))
    except ValueError:
        backoff = DEFAULT_BACKOFF_S
    return attempts, backoff


def _error_code(err: BaseException) -> tuple[str, int]:
    response = getattr(err, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_transient(err: BaseException) -> bool:
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
    )

    if isinstance(err, ConnectionError | HTTPClientError | IncompleteReadError):
        return True
    if isinstance(err, ClientError):
        code, status = _error_code(err)
        return status >= 500 or code in _RETRYABLE_CODES
    # urllib3 / socket errors that escape botocore while streaming a body
    return isinstance(err, ConnectionResetError | TimeoutError) or type(err).__name__ in {
        "ProtocolError",
        "ReadTimeoutError",
        "IncompleteRead",
    }


def _unwrap(err: Exception) -> BaseException:
    """The botocore error inside boto3's transfer-manager wrappers (S3UploadFailedError, ...)."""
    if type(err).__module__.startswith(("boto3", "s3transfer")) and err.__context__ is not None:
        return err.__context__
    return err


def _sleep(seconds: float) -> None:  # a seam for tests
    time.sleep(seconds)


def _translate(err: BaseException, uri: str, what: str) -> StorageError:
    """A `StorageError` for a non-transient (or finally failing) S3 error."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    endpoint = _endpoint()
    where = f"endpoint {endpoint} (AWS_ENDPOINT_URL)" if endpoint else "AWS S3 (AWS_ENDPOINT_URL is not set)"
    if isinstance(err, NoCredentialsError | PartialCredentialsError):
        return StorageError(uri, f"{what}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(err, ClientError):
        code, status = _error_code(err)
        if code == "NoSuchBucket":
            bucket = split_s3(uri)[0] if is_s3(uri) else "?"
            return StorageError(uri, f"{what}: bucket {bucket!r} does not exist on {where}; create it or fix the URI")
        if code in _NOT_FOUND_CODES or status == 404:
            return StorageNotFoundError(uri, f"{what}: no such object")
        if code in _AUTH_CODES or status == 403:
            return StorageError(
                uri,
                f"{what}: access denied ({code or status}) by {where}; check AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY and the bucket policy",
            )
        return StorageError(uri, f"{what}: S3 error {code or status}: {err} ({where})")
    if _is_transient(err):
        return StorageError(
            uri, f"{what}: cannot reach S3 at {where}: {err}. Is the server running and the endpoint right?"
        )
    return StorageError(uri, f"{what}: {type(err).__name__}: {err}")


def _with_retries(uri: str, what: str, fn: Callable[[], T]) -> T:
    """Run a whole S3 operation, retrying transient failures with exponential backoff and jitter."""
    attempts, delay = _retry_policy()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            err = _unwrap(exc)
            if not _is_transient(err):
                raise _translate(err, uri, what) from err
            if attempt == attempts:
                raise StorageError(
                    uri,
                    f"{_translate(err, uri, what).reason} (gave up after {attempts} attempts; "
                    f"set {RETRIES_ENV} / {BACKOFF_ENV} to wait longer)",
                ) from err
            wait = min(delay, MAX_BACKOFF_S) * (0.75 + 0.5 * random.random())
            log.warning("S3 %s %s failed (%s); retry %d/%d in %.1f s", what, uri, err, attempt, attempts - 1, wait)
            _sleep(wait)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _local_error(err: OSError, uri: str, what: str) -> StorageError:
    if isinstance(err, FileNotFoundError):
        return StorageNotFoundError(uri, f"{what}: no such file or folder")
    if isinstance(err, PermissionError):
        return StorageError(uri, f"{what}: permission denied; check the file's owner and mode")
    return StorageError(uri, f"{what}: {err.strerror or err}")


# --- operations ------------------------------------------------------------------------------------------


def list_files(uri: str | os.PathLike[str], suffixes: Iterable[str] | None = None) -> list[str]:
    """All files under a folder or prefix, recursively, as URIs of the same kind, sorted.

    Args:
        uri: a local folder or ``s3://bucket/prefix`` (the prefix is taken as a folder: ``s3://b/data`` does not
            list ``s3://b/data2/...``). A local file lists as itself.
        suffixes: keep only names ending with one of these (case-insensitive, e.g. ``[".jpg", ".png"]``).

    Raises:
        StorageNotFoundError: a local folder that does not exist. StorageError: S3 failures.
    """
    text = str(uri)
    ends = tuple(s.lower() for s in suffixes) if suffixes is not None else None

    def keep(name: str) -> bool:
        return ends is None or name.lower().endswith(ends)

    if is_s3(text):
        bucket, prefix = split_s3(text)
        if prefix and not prefix.endswith("/"):
            prefix += "/"

        def run() -> list[str]:
            out = []
            paginator = s3_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if not key.endswith("/") and keep(key):
                        out.append(f"s3://{bucket}/{key}")
            return out

        return sorted(_with_retries(text, "list", run))

    root = _local(text)
    if root.is_file():
        return [str(root)] if keep(root.name) else []
    if not root.is_dir():
        raise StorageNotFoundError(text, "list: no such folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=None):
        dirnames.sort()
        out.extend(str(Path(dirpath, name)) for name in filenames if keep(name))
    return sorted(out)


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    """The whole content of a file or object."""
    text = str(uri)
    if is_s3(text):
        bucket, key = split_s3(text)
        return _with_retries(text, "read", lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
    try:
        return _local(text).read_bytes()
    except OSError as err:
        raise _local_error(err, text, "read") from None


def _atomic_local(path: Path, write: Callable[[BinaryIO], None], uri: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _local_error(err, uri, "write") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _local_error(err, uri, "write") from None
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_local_atomic(path: str | os.PathLike[str], write: Callable[[str], object]) -> None:
    """Write a local file through ``write(temp_path)`` and rename it into place: never a half-written file.

    For writers that need a path (PIL, safetensors, tifffile); the file gets the usual umask permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole file or object atomically (readers see the old content or the new, never a part)."""
    text = str(uri)
    if is_s3(text):
        bucket, key = split_s3(text)
        _with_retries(text, "write", lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    _atomic_local(_local(text), lambda fh: fh.write(data), text)


def upload_file(local: str | os.PathLike[str], uri: str | os.PathLike[str]) -> None:
    """Copy a local file to a URI atomically (S3: multipart for big files; local: temp file + rename)."""
    text = str(uri)
    if is_s3(text):
        bucket, key = split_s3(text)
        if os.path.getsize(local) <= SINGLE_PUT_MAX_BYTES:

            def put() -> None:
                with open(local, "rb") as body:  # reopened per attempt: a retry sends the whole file again
                    s3_client().put_object(Bucket=bucket, Key=key, Body=body)

            _with_retries(text, "upload", put)
        else:  # multipart (boto3's transfer manager); the object appears when the upload completes
            _with_retries(text, "upload", lambda: s3_client().upload_file(str(local), bucket, key))
        return

    def copy(fh: BinaryIO) -> None:
        with open(local, "rb") as src:
            while chunk := src.read(1 << 20):
                fh.write(chunk)

    _atomic_local(_local(text), copy, text)


def download_file(uri: str | os.PathLike[str], local: str | os.PathLike[str]) -> None:
    """Copy a file or object to a local path (written atomically)."""
    text = str(uri)
    dest = Path(local)
    if is_s3(text):
        bucket, key = split_s3(text)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        try:
            _with_retries(text, "download", lambda: s3_client().download_file(bucket, key, tmp))
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return
    upload_file(_local(text), dest)


def exists(uri: str | os.PathLike[str]) -> bool:
    """Whether a file or object exists (for S3: an object with exactly this key)."""
    text = str(uri)
    if not is_s3(text):
        return _local(text).exists()
    bucket, key = split_s3(text)
    try:
        _with_retries(text, "stat", lambda: s3_client().head_object(Bucket=bucket, Key=key))
    except StorageNotFoundError:
        return False
    return True


def size(uri: str | os.PathLike[str]) -> int:
    """Size in bytes of a file or object."""
    text = str(uri)
    if is_s3(text):
        bucket, key = split_s3(text)
        head = _with_retries(text, "stat", lambda: s3_client().head_object(Bucket=bucket, Key=key))
        return int(head["ContentLength"])
    try:
        return _local(text).stat().st_size
    except OSError as err:
        raise _local_error(err, text, "stat") from None


def delete(uri: str | os.PathLike[str], missing_ok: bool = True) -> None:
    """Delete a file or object. A missing one is fine unless ``missing_ok`` is False (S3 cannot tell)."""
    text = str(uri)
    if is_s3(text):
        bucket, key = split_s3(text)
        _with_retries(text, "delete", lambda: s3_client().delete_object(Bucket=bucket, Key=key))
        return
    try:
        _local(text).unlink(missing_ok=missing_ok)
    except OSError as err:
        raise _local_error(err, text, "delete") from None


def read_json(uri: str | os.PathLike[str]) -> Any:
    """Parse a JSON file or object."""
    import json

    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as err:
        raise StorageError(str(uri), f"not valid JSON: {err}") from None


def write_json(uri: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    import json

    write_bytes(uri, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


class _S3RangeReader(io.RawIOBase):
    """A seekable, read-only S3 object: each read is a ranged GET (with retries). For pyarrow and friends."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.length = size(uri)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.length - self.pos)
        if n <= 0:
            return 0
        rng = f"bytes={self.pos}-{self.pos + n - 1}"

        def get() -> bytes:
            return s3_client().get_object(Bucket=self.bucket, Key=self.key, Range=rng)["Body"].read()

        data = _with_retries(self.uri, "read", get)
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)


def open_input_file(uri: str | os.PathLike[str], buffer_size: int = 1 << 20) -> BinaryIO:
    """A seekable binary file to read (``pyarrow.parquet.ParquetFile(open_input_file(uri))`` reads S3 by ranges).

    Use as a context manager. Local files are opened directly; S3 objects are read with ranged GETs on demand.
    """
    text = str(uri)
    if is_s3(text):
        return io.BufferedReader(_S3RangeReader(text), buffer_size=buffer_size)  # type: ignore[return-value]
    try:
        return open(_local(text), "rb")
    except OSError as err:
        raise _local_error(err, text, "open") from None
