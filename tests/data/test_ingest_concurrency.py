"""Concurrent writers: optimistic read-modify-write (`storage.update_bytes`) and two ingests into one dataset at
once, on a local folder and on S3 (moto, which honours If-Match / If-None-Match), plus streamed listings."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ddcolor import storage
from ddcolor.config import DataConfig
from ddcolor.data.ingest import ingest, load_manifest
from tests.helpers.data import read_dataset
from tests.helpers.images import make_random_images

SIZE = 32


def _cfg(**changes) -> DataConfig:
    return DataConfig(**{"size": SIZE, "shard_rows": 3, "val_fraction": 0.3, **changes})


def _increment(uri: str, times: int) -> None:
    def change(current: bytes | None) -> bytes:
        return str(int(current or b"0") + 1).encode()

    for _ in range(times):
        storage.update_bytes(uri, change)


def _local_increment(args: tuple[str, int]) -> None:  # a process-pool target
    _increment(*args)


def test_update_bytes_loses_no_update_between_processes(tmp_path):
    """4 processes x 10 read-modify-writes of one local file (flock on the folder): the count is exact."""
    import multiprocessing

    uri = str(tmp_path / "counter")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_local_increment, [(uri, 10)] * 4)
    assert Path(uri).read_bytes() == b"40"


def test_update_bytes_loses_no_update_on_s3(s3_env):
    """4 threads x 6 read-modify-writes of one object: conditional PUTs (If-Match / If-None-Match) make every
    writer that lost a race re-read and retry, so the count is exact."""
    uri = f"s3://{s3_env}/counter"
    assert storage.conditional_writes_supported(uri)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: _increment(uri, 6), range(4)))
    assert storage.read_bytes(uri) == b"24"
    assert storage.list_files(f"s3://{s3_env}") == [uri]  # the probe object is gone


def test_a_server_without_conditional_writes_gets_plain_writes_and_a_warning(s3_env, monkeypatch, caplog):
    monkeypatch.setattr(storage, "conditional_writes_supported", lambda uri: False)
    uri = f"s3://{s3_env}/counter"
    with caplog.at_level(logging.WARNING, logger="ddcolor.storage"):
        _increment(uri, 2)
    assert storage.read_bytes(uri) == b"2"
    assert "does not support conditional writes" in caplog.text and "one writer" in caplog.text


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_ingests_into_one_dataset_at_once_lose_no_shard_and_double_no_row(where, tmp_path, request):
    """Run A reads the manifest, then waits (inside its first mapper call) while run B ingests and commits an
    overlapping set of images; A then writes its shards and commits on top of B: every image once, nothing lost,
    A's copies of B's images counted as duplicates, and the replaced shard files are not left behind."""
    dest = str(tmp_path / "ds") if where == "local" else f"s3://{request.getfixturevalue('s3_env')}/ds"
    shared = make_random_images(tmp_path / "a", 4, start_seed=100)
    only_a = make_random_images(tmp_path / "a", 3, start_seed=200, prefix="a")
    for p in shared:  # B has the shared images (same bytes, other names) and its own
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / f"copy_{p.name}").write_bytes(p.read_bytes())
    only_b = make_random_images(tmp_path / "b", 2, start_seed=300, prefix="b")
    ingest(tmp_path / "b", dest, _cfg(), num_workers=0)  # the dataset exists before both runs (base manifest)
    for p in only_b:
        p.unlink()
    only_b = make_random_images(tmp_path / "b", 2, start_seed=400, prefix="b2")

    b_done = threading.Event()
    results: dict[str, object] = {}

    def blocking_mapper(fn, jobs):
        if fn.__name__ == "hash_batch" and not b_done.is_set():
            assert b_done.wait(120), "run B did not finish"
        return [fn(job) for job in jobs]

    def run_a():
        results["a"] = ingest(tmp_path / "a", dest, _cfg(), map_batches=blocking_mapper)

    thread = threading.Thread(target=run_a)
    thread.start()
    try:
        results["b"] = ingest(tmp_path / "b", dest, _cfg(), num_workers=0)
    finally:
        b_done.set()
        thread.join(180)
    a, b = results["a"], results["b"]
    assert (b.ingested, b.duplicates) == (2, 4)  # its new images; the shared ones were there already
    # A planned all 7 of its images as new (its base had only B's first run, which held the shared ones: duplicates)
    assert (a.ingested, a.duplicates) == (3, 4)

    manifest, rows = read_dataset(dest)
    hashes = [r["sha256"] for r in rows]
    assert len(hashes) == len(set(hashes)) == 4 + 2 + 2 + 3  # shared, B's first, B's second, A's own
    names = {Path(r["source_uri"]).name for r in rows}
    assert {p.name for p in only_a} <= names and {p.name for p in only_b} <= names
    assert manifest["counts"]["rows"] == len(rows) == a.total_rows
    listed = {s["path"] for s in manifest["shards"]}
    on_disk = {uri.split("/ds/", 1)[1] for uri in storage.list_files(storage.join(dest, "shards"))}
    assert on_disk == listed  # no orphan left by the commit
    index = storage.read_bytes(storage.join(dest, manifest["hash_index"]))
    assert len(index) == 32 * len(rows)


def test_a_rows_committed_by_another_run_meanwhile_are_dropped_from_this_runs_shards(tmp_path):
    """The overlap case: A and B both add the same new images at the same time; the later commit drops them."""
    dest = str(tmp_path / "ds")
    new = make_random_images(tmp_path / "a", 5, start_seed=500)
    (tmp_path / "b").mkdir()
    for p in new[:3]:
        (tmp_path / "b" / p.name).write_bytes(p.read_bytes())
    b_done = threading.Event()

    def blocking_mapper(fn, jobs):
        if fn.__name__ == "write_shard":  # A hashed against the empty dataset; now B commits first
            assert b_done.wait(120)
        return [fn(job) for job in jobs]

    holder: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: holder.setdefault("a", ingest(tmp_path / "a", dest, _cfg(), map_batches=blocking_mapper))
    )
    thread.start()
    try:
        b = ingest(tmp_path / "b", dest, _cfg(), num_workers=0)
    finally:
        b_done.set()
        thread.join(180)
    a = holder["a"]
    assert (b.ingested, b.duplicates) == (3, 0)
    assert (a.ingested, a.duplicates) == (2, 3) and a.balanced  # B's three rows dropped from A's shards
    manifest, rows = read_dataset(dest)
    assert sorted(r["sha256"] for r in rows) == sorted({r["sha256"] for r in rows}) and len(rows) == 5
    on_disk = {Path(p).name for p in storage.list_files(str(tmp_path / "ds" / "shards"))}
    assert on_disk == {Path(s["path"]).name for s in manifest["shards"]}
    assert json.loads((tmp_path / "ds" / "quarantine.json").read_text())["entries"] == []
    assert load_manifest(dest)["counts"]["rows"] == 5


def test_listing_streams_in_sorted_order(tmp_path, s3_env):
    """`iter_files` yields what `list_files` returns, in the same order, for tricky names (a folder "a" sorts
    between "a-b" and "a0"), locally and on S3 across several pages."""
    names = ["a-b.png", "a/x.png", "a/y/z.png", "a0.png", "b.png", "A.png", "a.png"]
    for name in names:
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(b"x")
    local = str(tmp_path / "src")
    assert list(storage.iter_files(local)) == storage.list_files(local) == sorted(f"{local}/{n}" for n in names)

    import boto3

    client = boto3.client("s3")
    keys = [f"many/{i:04d}.png" for i in range(1005)] + [f"many/{n}" for n in names]
    for key in keys:
        client.put_object(Bucket=s3_env, Key=key, Body=b"x")
    streamed = storage.iter_files(f"s3://{s3_env}/many")
    first = next(streamed)  # one page fetched, not the whole listing
    assert first == f"s3://{s3_env}/many/0000.png"
    assert [first, *streamed] == storage.list_files(f"s3://{s3_env}/many") == sorted(f"s3://{s3_env}/{k}" for k in keys)
