"""One storage layer for local paths and remote URIs (ingest, loader, DVC stages, flows), on fsspec.

Every function takes a URI: a local path (``data/shards``, ``/abs/path``, ``file:///abs/path``) or a remote URI
that fsspec knows: ``s3://bucket/prefix`` (s3fs, the ``train`` extra), ``https://host/file`` (read-only), and
``gs://`` / ``az://`` / ``abfs://`` once gcsfs / adlfs are installed (not part of the pinned stack, untested here).
S3 goes through one `s3fs.S3FileSystem` per process and settings, built from `ddcolor.config.EnvSettings`, so the
endpoint (``AWS_ENDPOINT_URL``: MinIO, moto, any S3-compatible store), credentials and region come from the
environment.

Robustness:

* Writes are atomic: a local file is written to a temporary name in the same folder and renamed; an S3 object
  appears whole or not at all (PUT and multipart upload are atomic per object).
* Retries, one layer per concern. Requests (S3): botocore's own retries, configured by the user's
  ``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE`` (or ``~/.aws/config``); nothing here overrides them, and s3fs's own
  retry loop is switched off. Body reads (a response cut off mid-stream, which botocore does not retry): retried
  here, ``DDCOLOR_STORAGE_RETRIES`` attempts (default 3) with exponential backoff from ``DDCOLOR_STORAGE_BACKOFF_S``
  (default 1.0 s, doubled per retry, at most 30 s). The README adds up the total budget.
* Failures raise `StorageError` (`StorageNotFoundError` for a missing file/object) naming the URI and what to check.
* Many small objects: `read_many` fetches them concurrently (fsspec's ``cat`` on one event loop).
* Millions of objects: `iter_files` streams a listing page by page (S3: 1,000 keys per request), in the sorted
  order of `list_files`, never the whole listing in memory.
* Read-modify-write under concurrency: `update_bytes` (optimistic: S3 conditional writes ``If-Match`` /
  ``If-None-Match`` where the server supports them; local files: an exclusive ``flock`` on the folder).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from ddcolor.errors import DDColorError

if TYPE_CHECKING:
    from botocore.client import BaseClient
    from fsspec import AbstractFileSystem

__all__ = [
    "ConcurrentUpdateError",
    "StorageError",
    "StorageNotFoundError",
    "conditional_writes_supported",
    "delete",
    "download_file",
    "exists",
    "filesystem",
    "is_remote",
    "is_s3",
    "iter_files",
    "join",
    "json_bytes",
    "list_files",
    "open_input_file",
    "read_bytes",
    "read_json",
    "read_many",
    "s3_client",
    "size",
    "split_s3",
    "update_bytes",
    "upload_file",
    "write_bytes",
    "write_json",
    "write_local_atomic",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRIES_ENV = "DDCOLOR_STORAGE_RETRIES"  # body-read attempts (requests: AWS_MAX_ATTEMPTS, botocore's)
BACKOFF_ENV = "DDCOLOR_STORAGE_BACKOFF_S"
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
SINGLE_PUT_MAX_BYTES = 256 << 20  # larger uploads go multipart
READ_MANY_BATCH = 64  # objects fetched at once by read_many

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_AUTH_CODES = frozenset(
    {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
# fsspec back-ends that are not installed with ddcolor: scheme -> package
_BACKEND_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


class StorageError(DDColorError):
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


def _scheme(uri: str | os.PathLike[str]) -> str | None:
    match = _SCHEME.match(str(uri))
    return match.group(1).lower() if match else None


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://...`` URIs."""
    return str(uri).startswith("s3://")


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for a URI with a scheme other than ``file://`` (``s3://``, ``https://``, ``gs://``, ...)."""
    return _scheme(uri) not in (None, "file")


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
    if is_remote(text):
        out = text.rstrip("/")
        for part in parts:
            part = str(part).strip("/")
            if part:
                out = f"{out}/{part}"
        return out
    return str(Path(_local(text), *map(str, parts)))


# --- file systems and retries ----------------------------------------------------------------------------

_fs_lock = threading.Lock()
_filesystems: dict[tuple[Any, ...], AbstractFileSystem] = {}


def _endpoint() -> str | None:
    from ddcolor.config import EnvSettings

    return EnvSettings.from_env().aws_endpoint_url


def _botocore_config() -> dict[str, Any]:
    """Client options that are not retries: timeouts, and with a custom endpoint, checksums only when an
    operation requires them (what MinIO and other S3-compatible stores accept)."""
    options: dict[str, Any] = {"connect_timeout": 10, "read_timeout": 60}
    if _endpoint():
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    return options


def _on_request_retry(uri_hint: str, attempt: int, error: object) -> None:
    """Called by botocore's ``needs-retry`` event after a failed S3 request (before botocore's own backoff):
    logs it. A seam for the fault tests, which restart the server here."""
    log.warning("S3 request failed (%s); botocore retries it (attempt %d)", error, attempt)


def _retry_observer(**kwargs: Any) -> None:
    """botocore ``needs-retry`` handler: observes, never decides (returns None, so botocore's handler decides)."""
    error = kwargs.get("caught_exception")
    response = kwargs.get("response")
    if error is None and response is not None:
        status = getattr(response[0], "status_code", 200) if response[0] is not None else 200
        code = (response[1] or {}).get("Error", {}).get("Code") if len(response) > 1 else None
        if status < 500 and code not in {"SlowDown", "Throttling", "RequestTimeout", "InternalError"}:
            return None
        error = f"HTTP {status} {code or ''}".strip()
    if error is not None:
        _on_request_retry(kwargs.get("event_name", ""), int(kwargs.get("attempts", 0) or 0), error)
    return None


def _s3fs() -> AbstractFileSystem:
    from ddcolor._optional import require
    from ddcolor.config import EnvSettings

    s3fs = require("s3fs", "train", "s3:// storage")
    kwargs = EnvSettings.from_env().s3_client_kwargs()
    # the retry settings are read by botocore when the client is made: a change makes a new client
    env = tuple(os.environ.get(n) for n in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_CONFIG_FILE", "AWS_PROFILE"))
    key = ("s3", os.getpid(), tuple(sorted(kwargs.items())), env)
    with _fs_lock:
        fs = _filesystems.get(key)
        if fs is None:
            import aiobotocore.session

            session = aiobotocore.session.AioSession()
            session.register("needs-retry.s3", _retry_observer)
            fs = s3fs.S3FileSystem(
                key=kwargs.get("aws_access_key_id"),
                secret=kwargs.get("aws_secret_access_key"),
                endpoint_url=kwargs.get("endpoint_url"),
                client_kwargs={"region_name": kwargs["region_name"]} if "region_name" in kwargs else None,
                config_kwargs=_botocore_config(),
                session=session,
                use_listings_cache=False,  # every listing is fresh: other writers change the bucket
                skip_instance_cache=True,  # cached here, per settings
            )
            fs.retries = 1  # s3fs's own retry loop is off: botocore retries requests, `_read_retrying` bodies
            _filesystems[key] = fs
    return fs


def filesystem(uri: str | os.PathLike[str]) -> tuple[AbstractFileSystem, str]:
    """The fsspec file system behind a URI and the path to give it (``s3://b/k`` -> (S3FileSystem, ``"b/k"``)).

    Raises:
        StorageError: a scheme whose fsspec back-end is not installed (the message names the package).
    """
    text = str(uri)
    scheme = _scheme(text)
    if scheme == "s3":
        bucket, key = split_s3(text)
        return _s3fs(), f"{bucket}/{key}"
    import fsspec

    if scheme in (None, "file"):
        return fsspec.filesystem("file"), str(_local(text).resolve())
    try:
        cls = fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as err:
        package = _BACKEND_PACKAGES.get(scheme)
        hint = f"pip install {package} (not part of ddcolor's pinned stack)" if package else str(err)
        raise StorageError(text, f"no file system for {scheme}:// is installed: {hint}") from None
    key = (scheme, os.getpid())
    with _fs_lock:
        fs = _filesystems.get(key)
        if fs is None:
            fs = _filesystems[key] = cls(skip_instance_cache=True)
    return fs, text if scheme in ("http", "https") else cls._strip_protocol(text)


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


def _request_attempts() -> str:
    """botocore's attempts per request, in words, for error messages."""
    if os.environ.get("AWS_MAX_ATTEMPTS", "").strip():
        return os.environ["AWS_MAX_ATTEMPTS"].strip()
    mode = os.environ.get("AWS_RETRY_MODE", "legacy").strip() or "legacy"
    return f"{3 if mode in ('standard', 'adaptive') else 5} ({mode} mode)"


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _is_body_read_error(err: BaseException) -> bool:
    """A response cut off while its body streams: botocore has retried the request, not this."""
    names = {type(e).__name__ for e in _chain(err)}
    return bool(
        names
        & {
            "ClientPayloadError",  # aiohttp: "Response payload is not completed"
            "IncompleteRead",
            "IncompleteReadError",  # botocore: Content-Length not reached
            "ResponseStreamingError",
            "ServerDisconnectedError",
            "ContentLengthError",
        }
    )


def _sleep(seconds: float) -> None:  # a seam for tests
    time.sleep(seconds)


def _client_error(err: BaseException) -> tuple[str, int] | None:
    for e in _chain(err):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = str(response.get("Error", {}).get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            return code, status
    return None


def _translate(err: BaseException, uri: str, what: str) -> StorageError:
    """A `StorageError` for a failed operation (botocore has already retried requests as configured)."""
    if isinstance(err, StorageError):
        return err
    chain = _chain(err)
    names = {type(e).__name__ for e in chain}
    if is_s3(uri):
        endpoint = _endpoint()
        where = f"endpoint {endpoint} (AWS_ENDPOINT_URL)" if endpoint else "AWS S3 (AWS_ENDPOINT_URL is not set)"
        if names & {"NoCredentialsError", "PartialCredentialsError"}:
            return StorageError(uri, f"{what}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        coded = _client_error(err)
        if coded is not None:
            code, status = coded
            if code == "NoSuchBucket":
                bucket = split_s3(uri)[0]
                return StorageError(
                    uri, f"{what}: bucket {bucket!r} does not exist on {where}; create it or fix the URI"
                )
            if code in _NOT_FOUND_CODES or status == 404:
                return StorageNotFoundError(uri, f"{what}: no such object")
            if code in _AUTH_CODES or status == 403:
                return StorageError(
                    uri,
                    f"{what}: access denied ({code or status}) by {where}; check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY and the bucket policy",
                )
            return StorageError(
                uri,
                f"{what}: S3 error {code or status}: {err} ({where}; gave up after {_request_attempts()} attempts; "
                "set AWS_MAX_ATTEMPTS / AWS_RETRY_MODE to wait longer)",
            )
        if isinstance(err, FileNotFoundError):
            return StorageNotFoundError(uri, f"{what}: no such object")
        if names & {"EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError"}:
            return StorageError(
                uri,
                f"{what}: cannot reach S3 at {where}: {err}. Is the server running and the endpoint right? "
                f"(gave up after {_request_attempts()} attempts; set AWS_MAX_ATTEMPTS / AWS_RETRY_MODE to wait "
                "longer)",
            )
        return StorageError(uri, f"{what}: {type(err).__name__}: {err} ({where})")
    if isinstance(err, FileNotFoundError):
        return StorageNotFoundError(uri, f"{what}: no such file or object")
    if isinstance(err, PermissionError):
        return StorageError(uri, f"{what}: permission denied; check the credentials of this file system")
    if isinstance(err, NotImplementedError):
        return StorageError(uri, f"{what}: not supported by {_scheme(uri)}:// (read-only?)")
    return StorageError(uri, f"{what}: {type(err).__name__}: {err}")


def _remote(uri: str, what: str, fn: Callable[[AbstractFileSystem, str], T]) -> T:
    """Run one remote operation (botocore retries its requests); errors become `StorageError`."""
    fs, path = filesystem(uri)
    try:
        return fn(fs, path)
    except StorageError:
        raise
    except Exception as err:
        raise _translate(err, uri, what) from err


def _read_retrying(uri: str, what: str, fn: Callable[[AbstractFileSystem, str], T]) -> T:
    """A remote read whose body may be cut off mid-stream: retried with exponential backoff and jitter.

    Only body-read failures are retried here; a request that fails has been retried by botocore already.
    """
    fs, path = filesystem(uri)
    attempts, delay = _retry_policy()
    for attempt in range(1, attempts + 1):
        try:
            return fn(fs, path)
        except StorageError:
            raise
        except Exception as err:
            if not _is_body_read_error(err):
                raise _translate(err, uri, what) from err
            if attempt == attempts:
                raise StorageError(
                    uri,
                    f"{what}: the response was cut off while reading: {err} (gave up after {attempts} attempts; "
                    f"set {RETRIES_ENV} / {BACKOFF_ENV} to wait longer)",
                ) from err
            wait = min(delay, MAX_BACKOFF_S) * (0.75 + 0.5 * random.random())
            log.warning("%s %s cut off (%s); retry %d/%d in %.1f s", what, uri, err, attempt, attempts - 1, wait)
            _sleep(wait)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def s3_client() -> BaseClient:
    """A plain boto3 S3 client with the same settings as the storage layer (endpoint, credentials, region,
    checksums; retries from ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE``), for callers that need raw S3 calls.

    Needs boto3 (the ``mlops`` extra); the storage functions themselves go through s3fs.
    """
    from ddcolor._optional import require
    from ddcolor.config import EnvSettings

    boto3 = require("boto3", "mlops", "a raw S3 client")
    from botocore.config import Config

    kwargs = EnvSettings.from_env().s3_client_kwargs()
    return boto3.session.Session().client("s3", config=Config(**_botocore_config()), **kwargs)


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
        uri: a local folder or a remote prefix such as ``s3://bucket/prefix`` (the prefix is taken as a folder:
            ``s3://b/data`` does not list ``s3://b/data2/...``). A local file lists as itself.
        suffixes: keep only names ending with one of these (case-insensitive, e.g. ``[".jpg", ".png"]``).

    Raises:
        StorageNotFoundError: a local folder that does not exist. StorageError: remote failures.
    """
    text = str(uri)
    ends = tuple(s.lower() for s in suffixes) if suffixes is not None else None

    def keep(name: str) -> bool:
        return ends is None or name.lower().endswith(ends)

    if is_remote(text):
        scheme = _scheme(text)

        def run(fs: AbstractFileSystem, path: str) -> list[str]:
            if scheme in ("http", "https"):
                raise StorageError(text, "list: an https:// source has no listing; give the file URIs")
            folder = path.rstrip("/") + "/"
            found = fs.find(path.rstrip("/"))
            name = (lambda p: f"s3://{p}") if scheme == "s3" else fs.unstrip_protocol
            return [name(p) for p in found if p.startswith(folder) and keep(p)]

        return sorted(_remote(text, "list", run))

    return list(iter_files(text, suffixes))


def iter_files(uri: str | os.PathLike[str], suffixes: Iterable[str] | None = None) -> Iterator[str]:
    """`list_files`, streamed: the same URIs in the same (sorted) order, produced as the listing goes.

    S3 is listed one page (1,000 keys, one request) at a time and local folders one directory at a time, so memory
    stays bounded whatever the number of files. Other remote schemes are listed whole (fsspec has no paged listing
    for all of them).

    Raises:
        StorageNotFoundError: a local folder that does not exist. StorageError: remote failures (a page request
            is retried by botocore like any request).
    """
    text = str(uri)
    ends = tuple(s.lower() for s in suffixes) if suffixes is not None else None

    def keep(name: str) -> bool:
        return ends is None or name.lower().endswith(ends)

    if is_s3(text):
        yield from (key for key in _iter_s3_keys(text) if keep(key))
        return
    if is_remote(text):
        yield from list_files(text, suffixes)
        return
    root = _local(text)
    if root.is_file():
        if keep(root.name):
            yield str(root)
        return
    if not root.is_dir():
        raise StorageNotFoundError(text, "list: no such folder")
    yield from (path for path in _walk_sorted(root) if keep(path))


def _walk_sorted(folder: Path) -> Iterator[str]:
    """Files under ``folder`` in the order of ``sorted(str(path))``, one directory read at a time.

    Siblings are sorted by name, a directory's name taken with its trailing separator ("a/" sorts after "a-b" and
    before "a0"), which is where its files fall in the sorted list of full paths. Like ``os.walk``: symbolic links
    to directories are not followed; unreadable directories are skipped.
    """
    try:
        with os.scandir(folder) as scan:
            entries = [(e.name + os.sep if e.is_dir() else e.name, e) for e in scan]
    except OSError:
        return
    for _key, entry in sorted(entries, key=lambda pair: pair[0]):
        if entry.is_dir():
            if not entry.is_symlink():
                yield from _walk_sorted(Path(entry.path))
        else:
            yield entry.path


def _iter_s3_keys(uri: str) -> Iterator[str]:
    """``s3://bucket/key`` of every object under the prefix ``uri`` (taken as a folder), page by page, sorted."""
    bucket, prefix = split_s3(uri)
    folder = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    client = s3_client()
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": folder}
        if token:
            kwargs["ContinuationToken"] = token
        try:
            page = client.list_objects_v2(**kwargs)
        except Exception as err:
            raise _translate(err, uri, "list") from None
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):  # a "folder marker" object is not a file
                yield f"s3://{bucket}/{item['Key']}"
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    """The whole content of a file or object."""
    text = str(uri)
    if is_remote(text):
        return _read_retrying(text, "read", lambda fs, path: fs.cat_file(path))
    try:
        return _local(text).read_bytes()
    except OSError as err:
        raise _local_error(err, text, "read") from None


def read_many(uris: Sequence[str | os.PathLike[str]], *, errors: str = "raise") -> list[bytes | StorageError]:
    """The contents of many files or objects, in order; remote ones fetched concurrently (fsspec ``cat``).

    For ingestion of many small images: one round trip's latency is paid per batch of `READ_MANY_BATCH`
    objects instead of per object. A batch whose bodies were cut off is retried like `read_bytes`.

    Args:
        uris: files or objects (local and remote may be mixed).
        errors: "raise" (the first failure raises its `StorageError`) or "return" (a failed entry is its
            `StorageError`, e.g. `StorageNotFoundError`, in the result).
    """
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
    texts = [str(u) for u in uris]
    out: list[bytes | StorageError | None] = [None] * len(texts)
    remote: dict[tuple[int, str], list[int]] = {}
    for i, text in enumerate(texts):
        if is_remote(text):
            fs, _ = filesystem(text)
            remote.setdefault((id(fs), _scheme(text) or ""), []).append(i)
        else:
            try:
                out[i] = read_bytes(text)
            except StorageError as err:
                out[i] = err
    for indices in remote.values():
        for first in range(0, len(indices), READ_MANY_BATCH):
            batch = indices[first : first + READ_MANY_BATCH]

            def cat(fs: AbstractFileSystem, _path: str, batch: list[int] = batch) -> dict[str, Any]:
                paths = [filesystem(texts[i])[1] for i in batch]
                got = fs.cat(paths, on_error="return")
                got = got if isinstance(got, dict) else {paths[0]: got}
                cut = [v for v in got.values() if isinstance(v, Exception) and _is_body_read_error(v)]
                if cut:
                    raise cut[0]  # retried as a whole: simpler than per key, and rare
                return {p: got.get(p) for p in paths}

            got = _read_retrying(texts[batch[0]], "read", cat)
            for i, value in zip(batch, got.values(), strict=True):
                ok = isinstance(value, bytes | bytearray)
                out[i] = bytes(value) if ok else _translate(value or FileNotFoundError(), texts[i], "read")
    if errors == "raise":
        for value in out:
            if isinstance(value, StorageError):
                raise value
    return out  # type: ignore[return-value]


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
    if is_remote(text):
        _remote(text, "write", lambda fs, path: fs.pipe_file(path, data))
        return
    _atomic_local(_local(text), lambda fh: fh.write(data), text)


class ConcurrentUpdateError(StorageError):
    """`update_bytes` lost the race too many times in a row (other writers keep changing the object)."""


#: `update_bytes` attempts before `ConcurrentUpdateError` (each attempt re-reads and recomputes).
UPDATE_ATTEMPTS = 20


def update_bytes(
    uri: str | os.PathLike[str], change: Callable[[bytes | None], bytes | None], *, attempts: int = UPDATE_ATTEMPTS
) -> bytes | None:
    """Read-modify-write of one file or object, safe against concurrent writers: no update is ever lost.

    ``change(current)`` gets the current content (None: no such file yet) and returns the new content, or None to
    leave it as it is. It may be called again with newer content when another writer got in first, so it must
    be a function of its argument (it may read other files).

    How the write is made conditional:
      * local files: an exclusive ``flock`` on the parent folder is held while reading, calling ``change`` and
        writing (atomically); writers on one host (or a file system with working ``flock``) queue up;
      * ``s3://``: optimistic concurrency with S3 conditional writes: the new object is PUT with ``If-Match:
        <ETag read>`` (``If-None-Match: *`` when there was none); on 412/409 it re-reads and calls ``change``
        again. A server that ignores the conditions (checked once per bucket, `conditional_writes_supported`) gets
        plain writes and a warning: run one writer at a time there;
      * other schemes: plain writes and a warning, as for such a server.

    Returns:
        The content written (or left, when ``change`` returned None).

    Raises:
        ConcurrentUpdateError: still losing the race after ``attempts`` tries. StorageError: storage failures.
    """
    text = str(uri)
    if not is_remote(text):
        return _update_local(_local(text), change, text)
    if not is_s3(text) or not conditional_writes_supported(text):
        _warn_unconditional(text)
        try:
            current: bytes | None = read_bytes(text)
        except StorageNotFoundError:
            current = None
        new = change(current)
        if new is not None and new != current:
            write_bytes(text, new)
        return current if new is None else new
    bucket, key = split_s3(text)
    client = s3_client()
    for attempt in range(attempts):
        etag: str | None = None
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            current, etag = response["Body"].read(), response["ETag"]
        except Exception as err:
            translated = _translate(err, text, "read")
            if not isinstance(translated, StorageNotFoundError):
                raise translated from None
            current = None
        new = change(current)
        if new is None or new == current:
            return current
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        try:
            client.put_object(Bucket=bucket, Key=key, Body=new, **condition)
            return new
        except Exception as err:
            coded = _client_error(err)
            if coded is None or not (coded[0] in _CONFLICT_CODES or coded[1] in (409, 412)):
                raise _translate(err, text, "write") from None
        wait = min(0.05 * 2**attempt, 2.0) * (0.5 + random.random())
        log.info("%s changed while it was being updated; retry %d/%d in %.2f s", text, attempt + 1, attempts, wait)
        _sleep(wait)
    raise ConcurrentUpdateError(text, f"update: other writers changed it {attempts} times in a row; try again")


_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})


def _update_local(path: Path, change: Callable[[bytes | None], bytes | None], uri: str) -> bytes | None:
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError as err:
        raise _local_error(err, uri, "update") from None
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # released when the descriptor is closed, also if this process dies
        try:
            current: bytes | None = path.read_bytes()
        except FileNotFoundError:
            current = None
        except OSError as err:
            raise _local_error(err, uri, "read") from None
        new = change(current)
        if new is None or new == current:
            return current
        _atomic_local(path, lambda fh: fh.write(new), uri)
        return new
    finally:
        os.close(folder)


@functools.cache
def _conditional_writes(endpoint: str | None, bucket: str, probe_key: str) -> bool:
    client = s3_client()
    client.put_object(Bucket=bucket, Key=probe_key, Body=b"ddcolor conditional-write probe\n")
    verdicts = []
    for condition in ({"IfMatch": '"0123456789abcdef0123456789abcdef"'}, {"IfNoneMatch": "*"}):
        try:
            client.put_object(Bucket=bucket, Key=probe_key, Body=b"probe\n", **condition)
            verdicts.append(False)  # the condition was ignored: the write went through
        except Exception as err:
            coded = _client_error(err)
            verdicts.append(coded is not None and (coded[0] in _CONFLICT_CODES or coded[1] in (409, 412)))
    with contextlib.suppress(Exception):
        client.delete_object(Bucket=bucket, Key=probe_key)
    return all(verdicts)


def conditional_writes_supported(uri: str) -> bool:
    """Whether the S3 server behind ``uri`` honours ``If-Match`` and ``If-None-Match`` on PUT (AWS S3 since
    2024-11, MinIO, moto). Probed once per process, endpoint and bucket with a small object
    ``<prefix>/.ddcolor-conditional-write-probe`` that is deleted again."""
    bucket, key = split_s3(uri)
    folder = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    try:
        return _conditional_writes(_endpoint(), bucket, folder + ".ddcolor-conditional-write-probe")
    except Exception as err:
        raise _translate(err, uri, "probe conditional writes") from None


_WARNED_UNCONDITIONAL: set[str] = set()


def _warn_unconditional(uri: str) -> None:
    where = f"{_scheme(uri)}://" if not is_s3(uri) else f"the S3 server at {_endpoint() or 'AWS'}"
    if where not in _WARNED_UNCONDITIONAL:
        _WARNED_UNCONDITIONAL.add(where)
        log.warning(
            "%s does not support conditional writes: concurrent updates of %s could overwrite each other; run one "
            "writer (e.g. one ingest per dataset) at a time there",
            where,
            uri,
        )


def upload_file(local: str | os.PathLike[str], uri: str | os.PathLike[str]) -> None:
    """Copy a local file to a URI atomically (S3: multipart for big files; local: temp file + rename)."""
    text = str(uri)
    if is_remote(text):
        if is_s3(text):  # one PUT up to SINGLE_PUT_MAX_BYTES, multipart above: the object appears when complete
            chunk = max(SINGLE_PUT_MAX_BYTES // 2 + 1, 5 << 20)
            _remote(text, "upload", lambda fs, path: fs.put_file(str(local), path, chunksize=chunk))
        else:
            _remote(text, "upload", lambda fs, path: fs.put_file(str(local), path))
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
    if is_remote(text):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        try:
            _read_retrying(text, "download", lambda fs, path: fs.get_file(path, tmp))
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return
    upload_file(_local(text), dest)


def _info(uri: str, what: str) -> dict[str, Any] | None:
    """fsspec ``info`` of a file or object; None if there is none (a folder/prefix counts as none)."""

    def run(fs: AbstractFileSystem, path: str) -> dict[str, Any] | None:
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return None
        return None if info.get("type") == "directory" else info

    return _remote(uri, what, run)


def exists(uri: str | os.PathLike[str]) -> bool:
    """Whether a file or object exists (remote: an object with exactly this key, not a prefix)."""
    text = str(uri)
    if not is_remote(text):
        return _local(text).exists()
    return _info(text, "stat") is not None


def size(uri: str | os.PathLike[str]) -> int:
    """Size in bytes of a file or object."""
    text = str(uri)
    if is_remote(text):
        info = _info(text, "stat")
        if info is None or info.get("size") is None:
            raise StorageNotFoundError(text, "stat: no such object" if info is None else "stat: size unknown")
        return int(info["size"])
    try:
        return _local(text).stat().st_size
    except OSError as err:
        raise _local_error(err, text, "stat") from None


def delete(uri: str | os.PathLike[str], missing_ok: bool = True) -> None:
    """Delete a file or object. A missing one is fine unless ``missing_ok`` is False (S3 cannot tell)."""
    text = str(uri)
    if is_remote(text):

        def run(fs: AbstractFileSystem, path: str) -> None:
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                if not missing_ok:
                    raise

        _remote(text, "delete", run)
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


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the indented UTF-8 JSON that `write_json` writes."""
    import json

    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(uri: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_bytes(uri, json_bytes(obj))


class _RangeReader(io.RawIOBase):
    """A seekable, read-only remote file: each read is one ranged GET (body reads retried). For pyarrow and friends.

    fsspec's own buffered files read ahead in blocks of their own; this one reads exactly what pyarrow asks for
    (the footer, then whole column chunks), which is what the loader's byte accounting expects.
    """

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri
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
        start = self.pos

        def get(fs: AbstractFileSystem, path: str) -> bytes:
            data = fs.cat_file(path, start=start, end=start + n)
            return data[start : start + n] if len(data) > n else data  # a server that ignored Range: whole file

        data = _read_retrying(self.uri, "read", get)
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)


def open_input_file(uri: str | os.PathLike[str], buffer_size: int = 1 << 20) -> BinaryIO:
    """A seekable binary file to read (``pyarrow.parquet.ParquetFile(open_input_file(uri))`` reads S3 by ranges).

    Use as a context manager. Local files are opened directly; remote ones are read with ranged GETs on demand.
    """
    text = str(uri)
    if is_remote(text):
        return io.BufferedReader(_RangeReader(text), buffer_size=buffer_size)  # type: ignore[return-value]
    try:
        return open(_local(text), "rb")
    except OSError as err:
        raise _local_error(err, text, "open") from None
