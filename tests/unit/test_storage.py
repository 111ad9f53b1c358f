"""ddcolor.storage: the same operations on local paths and on a real S3 server (moto subprocess)."""

from __future__ import annotations

import io
import pickle
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from ddcolor import storage
from ddcolor.storage import StorageError, StorageNotFoundError
from tests.helpers.servers import free_port, make_bucket


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A folder URI of each kind."""
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_env")
    return f"s3://{bucket}/store"


def test_join_and_split():
    assert storage.join("s3://b/p/", "shards", "/x.parquet") == "s3://b/p/shards/x.parquet"
    assert storage.join("s3://b", "a") == "s3://b/a"
    assert storage.join("data/shards", "manifest.json") == "data/shards/manifest.json"
    assert storage.split_s3("s3://b/a/b.txt") == ("b", "a/b.txt")
    assert storage.split_s3("s3://b") == ("b", "")
    assert storage.is_s3("s3://b/x") and not storage.is_s3("/tmp/x")
    with pytest.raises(StorageError, match="no bucket"):
        storage.split_s3("s3:///key")


def test_roundtrip_list_exists_delete(root):
    names = ["b.png", "a.JPG", "sub/c.png", "sub/deeper/d.txt"]
    for i, name in enumerate(names):
        storage.write_bytes(storage.join(root, name), bytes([i]) * (i + 1))
    # a sibling with a common prefix must not be listed
    storage.write_bytes(root + "2/other.png", b"x")

    assert storage.list_files(root) == sorted(storage.join(root, n) for n in names)
    assert storage.list_files(root, suffixes=[".png", ".jpg"]) == [
        storage.join(root, n) for n in ("a.JPG", "b.png", "sub/c.png")
    ]
    uri = storage.join(root, "sub/c.png")
    assert storage.read_bytes(uri) == b"\x02\x02\x02"
    assert storage.exists(uri) and storage.size(uri) == 3
    assert not storage.exists(storage.join(root, "nope.png"))
    storage.write_bytes(uri, b"new")  # overwrite
    assert storage.read_bytes(uri) == b"new"
    storage.write_json(storage.join(root, "m.json"), {"a": [1, 2]})
    assert storage.read_json(storage.join(root, "m.json")) == {"a": [1, 2]}
    storage.delete(uri)
    storage.delete(uri)  # missing is fine
    assert not storage.exists(uri)
    with pytest.raises(StorageNotFoundError) as info:
        storage.read_bytes(uri)
    assert uri in str(info.value) and isinstance(info.value, FileNotFoundError)


def test_upload_download_and_ranged_parquet(root, tmp_path):
    table = pa.table({"x": list(range(1000)), "s": [f"row{i}" for i in range(1000)]})
    local = tmp_path / "t.parquet"
    pq.write_table(table, local, row_group_size=100)
    uri = storage.join(root, "t.parquet")
    storage.upload_file(local, uri)
    assert storage.size(uri) == local.stat().st_size
    with storage.open_input_file(uri) as fh:
        pf = pq.ParquetFile(fh)
        assert pf.metadata.num_row_groups == 10
        assert pf.read_row_group(3, columns=["x"]).column("x").to_pylist() == list(range(300, 400))
        fh.seek(0)
        assert fh.read(4) == b"PAR1"
        fh.seek(-4, io.SEEK_END)
        assert fh.read(4) == b"PAR1"
    storage.download_file(uri, tmp_path / "copy" / "t.parquet")
    assert (tmp_path / "copy" / "t.parquet").read_bytes() == local.read_bytes()
    assert pq.read_table(tmp_path / "copy" / "t.parquet").equals(table)


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "d" / "f.bin"
    storage.write_bytes(target, b"old")

    def boom(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(StorageError, match="No space left"):
        storage.write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_local_errors_name_the_path(tmp_path):
    with pytest.raises(StorageNotFoundError, match="no such folder"):
        storage.list_files(tmp_path / "missing")
    with pytest.raises(StorageNotFoundError, match=str(tmp_path / "missing.bin")):
        storage.read_bytes(tmp_path / "missing.bin")


def test_errors_are_picklable():
    err = pickle.loads(pickle.dumps(StorageNotFoundError("s3://b/k", "read: no such object")))
    assert isinstance(err, StorageNotFoundError) and err.uri == "s3://b/k" and "no such object" in str(err)


def test_missing_bucket_is_a_clear_error(s3_env):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as info:
        storage.write_bytes("s3://no-such-bucket/x", b"1")
    assert "AWS_ENDPOINT_URL" in str(info.value)
    assert not isinstance(info.value, StorageNotFoundError)


def test_clients_use_env_endpoint_checksums_and_the_users_retry_settings(s3_env, s3_server, monkeypatch):
    """No hard-coded retry config: AWS_MAX_ATTEMPTS / AWS_RETRY_MODE reach botocore; s3fs's own loop is off."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    fs, path = storage.filesystem(f"s3://{s3_env}/a/b.bin")
    assert path == f"{s3_env}/a/b.bin" and fs.retries == 1
    fs.connect()
    for client in (fs.s3, storage.s3_client()):
        assert client.meta.endpoint_url == s3_server.endpoint_url
        assert client.meta.config.request_checksum_calculation == "when_required"
        assert client.meta.config.response_checksum_validation == "when_required"
        assert client.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 7}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # a change of settings gets a new client
    other, _ = storage.filesystem(f"s3://{s3_env}/x")
    other.connect()
    assert other is not fs and other.s3.meta.config.retries["total_max_attempts"] == 2


def _payload_error():
    from aiohttp import ClientPayloadError

    return ClientPayloadError("Response payload is not completed")


def test_body_read_retry_backs_off_then_succeeds(monkeypatch):
    """Only a body cut off mid-stream is retried here (botocore retries requests, not bodies)."""
    from botocore.exceptions import IncompleteReadError

    sleeps: list[float] = []
    monkeypatch.setattr(storage, "_sleep", sleeps.append)
    monkeypatch.setenv(storage.RETRIES_ENV, "5")
    monkeypatch.setenv(storage.BACKOFF_ENV, "1")
    calls = []

    def flaky(fs, path):
        calls.append(path)
        if len(calls) == 1:
            raise _payload_error()
        if len(calls) == 2:
            raise OSError("wrapped") from IncompleteReadError(actual_bytes=3, expected_bytes=9)
        return b"ok"

    assert storage._read_retrying("memory:///b/k", "read", flaky) == b"ok"
    assert calls == ["/b/k"] * 3
    assert len(sleeps) == 2 and 0.75 <= sleeps[0] <= 1.25 and 1.5 <= sleeps[1] <= 2.5  # exponential, jittered

    monkeypatch.setenv(storage.RETRIES_ENV, "2")
    with pytest.raises(StorageError, match=r"cut off while reading.*gave up after 2 attempts.*DDCOLOR_STORAGE"):
        storage._read_retrying("memory:///b/k", "read", lambda fs, path: (_ for _ in ()).throw(_payload_error()))


def test_request_errors_are_not_retried_again(monkeypatch):
    """Client errors and failed requests (already retried by botocore) go straight to a clear StorageError."""
    monkeypatch.setattr(storage, "_sleep", lambda s: pytest.fail("must not retry"))
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Get")
    unreachable = EndpointConnectionError(endpoint_url="http://x")
    for err, message in [(denied, r"access denied.*AWS_ACCESS_KEY_ID"), (unreachable, "cannot reach S3")]:

        def fail(fs, path, err=err):
            raise err

        with pytest.raises(StorageError, match=message):
            storage._read_retrying("s3://b/k", "read", fail)


def test_unreachable_endpoint_gives_up_with_a_clear_error(s3_env, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    retries: list[int] = []
    monkeypatch.setattr(storage, "_on_request_retry", lambda where, attempt, err: retries.append(attempt))
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://bucket/key")
    message = str(info.value)
    assert "s3://bucket/key" in message and endpoint in message and "gave up after 2 attempts" in message
    assert "AWS_MAX_ATTEMPTS" in message
    assert retries == [1, 2]  # botocore made exactly the 2 attempts the user asked for; storage added none
    assert time.monotonic() - start < 20


def test_survives_a_server_restart(s3_env, s3_server, monkeypatch):
    """A real server stop: botocore retries the request (AWS_MAX_ATTEMPTS) and the server is back before it does."""

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    uri = f"s3://{s3_env}/k.bin"
    storage.write_bytes(uri, b"before")
    s3_server.stop()
    retries: list[int] = []

    def bring_back(where: str, attempt: int, error: object) -> None:  # no timer, so no race with a slow machine
        retries.append(attempt)
        if not s3_server.running:
            s3_server.start()
            make_bucket(s3_server.endpoint_url, s3_env)

    monkeypatch.setattr(storage, "_on_request_retry", bring_back)
    assert storage.list_files(f"s3://{s3_env}/") == []  # ListObjects on the (re-created, empty) bucket
    assert retries == [1]
    storage.write_bytes(uri, b"after")
    assert storage.read_bytes(uri) == b"after"


# --- other fsspec back-ends: https (read-only), memory; many small objects at once -----------------------


class _Handler:
    """http.server handler factory: files from a dict, Range support, and a first response cut off mid-body."""

    @staticmethod
    def make(files: dict[str, bytes], cut_first: set[str], requests: list[str]):
        from http.server import BaseHTTPRequestHandler

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, body_out: bool) -> None:
                data = files.get(self.path)
                requests.append(f"{self.command} {self.path} {self.headers.get('Range', '')}".strip())
                if data is None:
                    self.send_error(404)
                    return
                status, body = 200, data
                if rng := self.headers.get("Range"):
                    first, _, last = rng.removeprefix("bytes=").partition("-")
                    end = min(int(last) + 1 if last else len(data), len(data))
                    status, body = 206, data[int(first) : end]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not body_out:
                    return
                if self.path in cut_first and self.command == "GET":
                    cut_first.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])  # then the connection closes: a truncated body
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def do_GET(self):
                self._send(True)

            def do_HEAD(self):
                self._send(False)

        return Handler


@pytest.fixture
def http_files():
    """A local http.server on 127.0.0.1 serving an in-memory dict; yields (base_url, files, cut_first, requests)."""
    import threading
    from http.server import ThreadingHTTPServer

    files: dict[str, bytes] = {}
    cut_first: set[str] = set()
    requests: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler.make(files, cut_first, requests))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files, cut_first, requests
    finally:
        server.shutdown()
        server.server_close()


def test_https_read_size_exists_ranged_and_download(http_files, tmp_path):
    base, files, _, requests = http_files
    table = pa.table({"x": list(range(2000))})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=500)
    files["/d/t.parquet"] = sink.getvalue()
    files["/d/a.txt"] = b"hello"
    assert storage.is_remote(f"{base}/d/a.txt") and not storage.is_s3(f"{base}/d/a.txt")
    assert storage.read_bytes(f"{base}/d/a.txt") == b"hello"
    assert storage.exists(f"{base}/d/a.txt") and not storage.exists(f"{base}/d/missing.txt")
    assert storage.size(f"{base}/d/t.parquet") == len(files["/d/t.parquet"])
    with pytest.raises(StorageNotFoundError, match=r"missing\.txt"):
        storage.read_bytes(f"{base}/d/missing.txt")
    requests.clear()
    with storage.open_input_file(f"{base}/d/t.parquet", buffer_size=4096) as fh:
        assert pq.ParquetFile(fh).read_row_group(3).column("x").to_pylist() == list(range(1500, 2000))
    assert requests and all("bytes=" in r for r in requests if r.startswith("GET"))  # ranged reads only
    storage.download_file(f"{base}/d/a.txt", tmp_path / "got" / "a.txt")
    assert (tmp_path / "got" / "a.txt").read_bytes() == b"hello"
    with pytest.raises(StorageError, match="no listing"):
        storage.list_files(f"{base}/d/")
    with pytest.raises(StorageError, match="write"):
        storage.write_bytes(f"{base}/d/new.txt", b"x")


def test_https_body_cut_off_mid_stream_is_retried(http_files, monkeypatch):
    """The first GET sends half the body and closes: the storage layer's body-read retry reads it again."""
    base, files, cut_first, requests = http_files
    files["/big.bin"] = bytes(range(256)) * 64
    cut_first.add("/big.bin")
    sleeps: list[float] = []
    monkeypatch.setattr(storage, "_sleep", sleeps.append)
    assert storage.read_bytes(f"{base}/big.bin") == files["/big.bin"]
    assert len(sleeps) == 1 and [r for r in requests if r.startswith("GET")] == ["GET /big.bin"] * 2


def test_read_many_concurrent_on_s3_local_and_https(s3_env, http_files, tmp_path):
    base, files, _, _ = http_files
    uris = [f"s3://{s3_env}/many/{i:03d}.bin" for i in range(40)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, bytes([i]) * (i + 1))
    files["/h.bin"] = b"web"
    (tmp_path / "l.bin").write_bytes(b"local")
    mixed = [*uris, f"{base}/h.bin", str(tmp_path / "l.bin")]
    got = storage.read_many(mixed)
    assert got == [bytes([i]) * (i + 1) for i in range(40)] + [b"web", b"local"]
    missing = [uris[0], f"s3://{s3_env}/many/nope.bin", f"{base}/nope", str(tmp_path / "nope")]
    got = storage.read_many(missing, errors="return")
    assert got[0] == b"\x00" and all(isinstance(e, StorageNotFoundError) for e in got[1:])
    assert [e.uri for e in got[1:]] == missing[1:]
    with pytest.raises(StorageNotFoundError, match=r"nope\.bin"):
        storage.read_many(missing)


def test_generic_fsspec_backend_and_missing_backends():
    """memory:// stands in for any fsspec file system (gs://, az:// go the same way once installed)."""
    root = "memory:///ddcolor-test-store"
    storage.write_bytes(storage.join(root, "a.png"), b"1")
    storage.upload_file(__file__, storage.join(root, "sub", "t.py"))
    assert storage.list_files(root, suffixes=[".png", ".py"]) == [f"{root}/a.png", f"{root}/sub/t.py"]
    assert storage.size(f"{root}/a.png") == 1 and storage.exists(f"{root}/a.png") and not storage.exists(root)
    storage.delete(f"{root}/a.png")
    assert not storage.exists(f"{root}/a.png")
    for uri, package in [("gs://bucket/x", "gcsfs"), ("az://container/x", "adlfs")]:
        with pytest.raises(StorageError, match=f"pip install {package}"):
            storage.read_bytes(uri)
