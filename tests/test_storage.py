"""ddcolor.storage: the same operations on local paths and on a real S3 server (moto subprocess)."""

from __future__ import annotations

import io
import pickle
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from conftest import free_port

from ddcolor import storage
from ddcolor.storage import StorageError, StorageNotFoundError


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


def test_client_uses_env_endpoint_and_checksum_config(s3_env, s3_server):
    client = storage.s3_client()
    assert client.meta.endpoint_url == s3_server.endpoint_url
    assert client.meta.config.request_checksum_calculation == "when_required"
    assert client.meta.config.response_checksum_validation == "when_required"
    assert client.meta.config.retries["mode"] == "standard"


def test_retry_wrapper_backs_off_then_succeeds(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(storage, "_sleep", sleeps.append)
    monkeypatch.setenv(storage.RETRIES_ENV, "5")
    monkeypatch.setenv(storage.BACKOFF_ENV, "1")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise EndpointConnectionError(endpoint_url="http://x")
        if len(calls) == 2:
            raise ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Put")
        return "ok"

    assert storage._with_retries("s3://b/k", "write", flaky) == "ok"
    assert len(calls) == 3
    assert len(sleeps) == 2 and 0.75 <= sleeps[0] <= 1.25 and 1.5 <= sleeps[1] <= 2.5  # exponential, jittered


def test_retry_wrapper_does_not_retry_client_errors(monkeypatch):
    monkeypatch.setattr(storage, "_sleep", lambda s: pytest.fail("must not retry"))
    err = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Get")

    def denied():
        raise err

    with pytest.raises(StorageError, match=r"access denied.*AWS_ACCESS_KEY_ID"):
        storage._with_retries("s3://b/k", "read", denied)


def test_unreachable_endpoint_gives_up_with_a_clear_error(s3_env, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv(storage.RETRIES_ENV, "2")
    monkeypatch.setenv(storage.BACKOFF_ENV, "0.01")
    monkeypatch.setattr(storage, "BOTOCORE_MAX_ATTEMPTS", 1)
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://bucket/key")
    message = str(info.value)
    assert "s3://bucket/key" in message and endpoint in message and "gave up after 2 attempts" in message
    assert time.monotonic() - start < 10


def test_survives_a_server_restart(s3_env, s3_server, monkeypatch):
    """A real server stop: the operation waits (retrying with backoff) until the server is back."""
    from conftest import make_bucket

    monkeypatch.setenv(storage.BACKOFF_ENV, "0.2")
    uri = f"s3://{s3_env}/k.bin"
    storage.write_bytes(uri, b"before")
    s3_server.stop()

    import threading

    def bring_back():
        time.sleep(0.5)
        s3_server.start()
        make_bucket(s3_server.endpoint_url, s3_env)

    thread = threading.Thread(target=bring_back)
    thread.start()
    try:
        # ListObjects on the (re-created, empty) bucket: retried until the server answers
        deadline = time.monotonic() + 30
        while True:
            try:
                assert storage.list_files(f"s3://{s3_env}/") == []
                break
            except StorageError as err:  # NoSuchBucket in the instant between start and create_bucket
                assert "does not exist" in str(err) and time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        thread.join()
    storage.write_bytes(uri, b"after")
    assert storage.read_bytes(uri) == b"after"
