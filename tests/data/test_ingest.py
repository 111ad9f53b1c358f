"""Ingestion: local and S3 sources/destinations, quarantine, dedup, incremental runs, S3 faults, CLI."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ddcolor import storage
from ddcolor.cli import app
from ddcolor.color import colorfulness_np
from ddcolor.config import DataConfig
from ddcolor.data.ingest import IngestError, ingest, load_manifest, load_quarantine
from ddcolor.data.shards import decode_lab, split_for
from tests.helpers.data import dataset_content, read_dataset
from tests.helpers.images import ImageCorpus, make_random_images, random_color_image
from tests.helpers.servers import make_bucket

SIZE = 64


def _cfg(corpus: ImageCorpus | None = None, **changes) -> DataConfig:
    values = {"size": SIZE, "shard_rows": 4, "val_fraction": 0.3}
    if corpus is not None:
        values["max_image_pixels"] = corpus.max_pixels
    return DataConfig(**{**values, **changes})


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_corpus_result(report, rows, quarantine, corpus: ImageCorpus, source_uri) -> None:
    assert report.balanced
    assert (report.inputs, report.ingested, report.duplicates) == (len(corpus.all), len(corpus.good), 0)
    by_uri = {q.source_uri: q.reason for q in report.quarantined}
    assert set(by_uri) == {source_uri(p) for p in corpus.bad}
    for path, keyword in corpus.bad.items():
        assert keyword in by_uri[source_uri(path)].lower(), (path.name, by_uri[source_uri(path)])
    assert "32 px" in by_uri[source_uri(corpus.root / "tiny.png")]  # the threshold is named
    assert {e["source_uri"]: e["reason"] for e in quarantine} == by_uri
    assert all(e["sha256"] for e in quarantine)  # every bad file was readable (even the empty one)
    assert {r["source_uri"]: r["sha256"] for r in rows} == {source_uri(p): _sha(p) for p in corpus.good}


def test_local_ingest_of_good_and_bad_images(bad_image_corpus: ImageCorpus, tmp_path):
    corpus = bad_image_corpus
    dest = str(tmp_path / "ds")
    report = ingest(corpus.root, dest, _cfg(corpus), num_workers=0)

    manifest, rows = read_dataset(dest)
    _check_corpus_result(report, rows, load_quarantine(dest), corpus, lambda p: str(p.resolve()))
    assert manifest["format"] == "ddcolor-shards" and manifest["format_version"] == 1
    assert manifest["config"] == {"size": SIZE, "resize_mode": "resize", "val_fraction": 0.3, "min_colorfulness": 15.0}
    # shards of data.shard_rows = 4 readable, new files each, in input order; a shard is short by the files of it
    # that failed to decode (they are quarantined after the shard was planned)
    planned = sorted(corpus.all, key=lambda p: str(p.resolve()))  # every bad file here is readable, so hashed
    per_shard = [len([p for p in planned[i : i + 4] if p in corpus.good]) for i in range(0, len(planned), 4)]
    assert [s["rows"] for s in manifest["shards"]] == [n for n in per_shard if n]  # a shard left empty: none
    assert report.total_rows == len(corpus.good) and len(report.new_shards) == len(manifest["shards"])
    for row in rows:
        assert (row["height"], row["width"]) == (SIZE, SIZE)
        lightness, ab = decode_lab(row["L"], row["ab"], SIZE, SIZE)
        assert lightness.min() >= 0.0 and lightness.max() <= 100.0 and np.abs(ab).max() <= 128
        assert row["split"] == split_for(row["sha256"], 0.3)
        assert row["low_colorfulness"] == (row["colorfulness"] < 15.0)
        assert row["ingested_at"].tzinfo is not None
    assert {r["split"] for r in rows} == {"train", "val"}
    # the low-colorfulness flag: the gray photo yes, the colorful images no
    flag = {r["source_uri"]: r["low_colorfulness"] for r in rows}
    assert flag[str(corpus.gray.resolve())] is True
    assert not any(flag[str(p.resolve())] for p in corpus.colorful)
    assert "quarantined" in report.summary() and "notes.jpg" in report.summary()


def test_rerun_is_idempotent_and_new_images_are_appended(bad_image_corpus: ImageCorpus, tmp_path):
    corpus = bad_image_corpus
    dest = tmp_path / "ds"
    cfg = _cfg(corpus)
    ingest(corpus.root, dest, cfg, num_workers=0)
    files_before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in dest.rglob("*") if p.is_file()}

    again = ingest(corpus.root, dest, cfg, num_workers=0)
    assert (again.ingested, again.duplicates, len(again.quarantined)) == (0, len(corpus.good), len(corpus.bad))
    assert again.new_shards == []
    files_after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in dest.rglob("*") if p.is_file()}
    assert files_after == files_before  # nothing rewritten: manifest, quarantine and shards identical

    new = make_random_images(corpus.root / "more", 5, start_seed=5000)
    (corpus.root / "more" / "copy_of_astronaut.jpg").write_bytes((corpus.root / "astronaut.jpg").read_bytes())
    grown = ingest(corpus.root, dest, cfg, num_workers=0)
    assert (grown.ingested, grown.duplicates, len(grown.quarantined)) == (5, len(corpus.good) + 1, len(corpus.bad))
    manifest, rows = read_dataset(str(dest))
    assert len(rows) == len(corpus.good) + 5
    old_paths = [str(p.relative_to(dest)) for p in files_before if p.parent.name == "shards"]
    assert [s["path"] for s in manifest["shards"]][: len(old_paths)] == sorted(old_paths)
    assert grown.new_shards == [s["path"] for s in manifest["shards"][len(old_paths) :]]
    assert sum(s["rows"] for s in manifest["shards"][len(old_paths) :]) == 5
    for path in old_paths:  # old shards untouched
        assert (dest / path).read_bytes() == files_before[dest / path][0]
    new_rows = {r["sha256"] for r in rows if r["source_uri"].startswith(str((corpus.root / "more").resolve()))}
    assert new_rows == {_sha(p) for p in new}
    assert len(load_quarantine(str(dest))) == len(corpus.bad)  # not repeated across runs


def test_duplicates_under_other_names_are_skipped(tmp_path):
    src = tmp_path / "src"
    first, second = make_random_images(src, 2)
    (src / "a_copy.png").write_bytes(first.read_bytes())
    (src / "sub").mkdir()
    (src / "sub" / "b_copy.png").write_bytes(second.read_bytes())
    (src / ".hidden.png").write_bytes(first.read_bytes())  # hidden: not an input
    (src / "README.txt").write_text("not an image extension: not an input")
    report = ingest(src, tmp_path / "ds", _cfg(), num_workers=0)
    assert (report.inputs, report.ingested, report.duplicates, report.skipped) == (4, 2, 2, 2)
    _, rows = read_dataset(str(tmp_path / "ds"))
    # the first in sorted order wins
    assert sorted(Path(r["source_uri"]).name for r in rows) == ["a_copy.png", "rand_01001.png"]


def test_split_is_deterministic_across_datasets(tmp_path):
    make_random_images(tmp_path / "src", 12)
    splits = []
    for name in ("one", "two"):
        ingest(tmp_path / "src", tmp_path / name, _cfg(val_fraction=0.5), num_workers=0)
        splits.append({r["sha256"]: r["split"] for r in read_dataset(str(tmp_path / name))[1]})
    assert splits[0] == splits[1]
    assert set(splits[0].values()) == {"train", "val"}


def test_resize_modes_and_exif_orientation(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # 128x64 (w x h): left quarter red, the rest blue
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, :32] = (220, 20, 20)
    wide[:, 32:] = (20, 20, 220)
    Image.fromarray(wide).save(src / "wide.png")
    # stored landscape: left half red, right half blue; EXIF orientation 6 (rotate 90 degrees clockwise to show)
    # -> upright: red on top, blue at the bottom
    stored = np.zeros((64, 96, 3), np.uint8)
    stored[:, :48] = (220, 20, 20)
    stored[:, 48:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(src / "rotated.png", exif=exif.tobytes())

    results = {}
    for mode in ("resize", "center_crop"):
        dest = tmp_path / mode
        ingest(src, dest, _cfg(resize_mode=mode), num_workers=0)
        manifest, rows = read_dataset(str(dest))
        assert manifest["config"]["resize_mode"] == mode
        for row in rows:
            assert (row["height"], row["width"]) == (SIZE, SIZE)
            results[mode, Path(row["source_uri"]).stem] = decode_lab(row["L"], row["ab"], SIZE, SIZE)[1]
    # b*: red is yellowish (b > 0), blue is strongly negative
    b_resize, b_crop = results["resize", "wide"][1], results["center_crop", "wide"][1]
    assert b_resize[:, :8].mean() > 20  # resize keeps the red quarter (squeezed)
    assert b_crop.max() < 0  # the center crop of a 2:1 image drops the outer quarters: no red left
    for mode in ("resize", "center_crop"):
        b = results[mode, "rotated"][1]
        assert b[:8].mean() > 20 and b[-8:].mean() < -50  # red on top: the EXIF rotation was applied


def test_incompatible_dataset_is_refused(tmp_path):
    make_random_images(tmp_path / "src", 2)
    ingest(tmp_path / "src", tmp_path / "ds", _cfg(), num_workers=0)
    with pytest.raises(IngestError, match=r"data.size=128 \(dataset: 64\)"):
        ingest(tmp_path / "src", tmp_path / "ds", _cfg(size=128), num_workers=0)


def test_damaged_shard_is_named_when_the_hash_index_is_rebuilt(tmp_path):
    """A rerun dedups against the manifest's hash index and reads no shard (damage is `ddcolor validate`'s to
    find); when the index is gone it is rebuilt from the shards, and a damaged shard is named then."""
    make_random_images(tmp_path / "src", 2)
    ingest(tmp_path / "src", tmp_path / "ds", _cfg(), num_workers=0)
    manifest = load_manifest(str(tmp_path / "ds"))
    index = tmp_path / "ds" / manifest["hash_index"]
    assert index.stat().st_size == 2 * 32  # two sha256 digests
    index.unlink()
    again = ingest(tmp_path / "src", tmp_path / "ds", _cfg(), num_workers=0)  # rebuilt from the shards
    assert (again.ingested, again.duplicates) == (0, 2) and index.stat().st_size == 2 * 32
    shard = next((tmp_path / "ds").rglob("*.parquet"))
    shard.write_bytes(b"PAR1 this is not parquet PAR1")
    index.unlink()
    with pytest.raises(IngestError, match=rf"{shard.name}: unreadable shard .*dataset at .* is damaged"):
        ingest(tmp_path / "src", tmp_path / "ds", _cfg(), num_workers=0)


def test_all_bad_source_still_writes_an_empty_dataset(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.jpg").write_bytes(b"")
    report = ingest(tmp_path / "src", tmp_path / "ds", _cfg(), num_workers=0)
    assert (report.inputs, report.ingested, len(report.quarantined)) == (1, 0, 1)
    manifest, rows = read_dataset(str(tmp_path / "ds"))
    assert rows == [] and manifest["counts"]["shards"] == 0


# --- S3 ----------------------------------------------------------------------------------------------------


def _client(endpoint: str):
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )


def _upload_tree(root: Path, bucket: str, prefix: str, endpoint: str) -> None:
    client = _client(endpoint)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.put_object(
                Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes()
            )


def _snapshot(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = _client(endpoint)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _restore(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    """Re-create the bucket and its objects after a restart (moto keeps state in memory; MinIO would not lose it)."""
    make_bucket(endpoint, bucket)
    client = _client(endpoint)
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


def test_local_to_s3_and_s3_to_s3(bad_image_corpus: ImageCorpus, s3_env: str, s3_server, tmp_path):
    corpus = bad_image_corpus
    cfg = _cfg(corpus)
    local = str(tmp_path / "local")
    ingest(corpus.root, local, cfg, num_workers=0)
    _, local_rows = read_dataset(local)

    dest = f"s3://{s3_env}/from-local"
    report = ingest(corpus.root, dest, cfg, num_workers=0)
    _, rows = read_dataset(dest)
    _check_corpus_result(report, rows, load_quarantine(dest), corpus, lambda p: str(p.resolve()))

    _upload_tree(corpus.root, s3_env, "raw", s3_server.endpoint_url)
    dest = f"s3://{s3_env}/from-s3"
    report = ingest(f"s3://{s3_env}/raw", dest, cfg, num_workers=2)  # workers read S3 themselves
    _, rows = read_dataset(dest)
    uri = lambda p: f"s3://{s3_env}/raw/{p.relative_to(corpus.root).as_posix()}"  # noqa: E731
    _check_corpus_result(report, rows, load_quarantine(dest), corpus, uri)
    # same pixels whatever the source, the destination and the number of processes
    expected = {r["sha256"]: (r["L"], r["ab"], r["split"]) for r in local_rows}
    assert {r["sha256"]: (r["L"], r["ab"], r["split"]) for r in rows} == expected
    manifest = load_manifest(dest)
    assert storage.list_files(dest) == sorted(  # nothing else (the conditional-write probe object is gone)
        [storage.join(dest, "manifest.json"), storage.join(dest, "quarantine.json")]
        + [storage.join(dest, p) for p in [*report.new_shards, manifest["hash_index"]]]
    )

    again = ingest(f"s3://{s3_env}/raw", dest, cfg, num_workers=0)
    assert (again.ingested, again.duplicates) == (0, len(corpus.good))


@pytest.fixture
def fast_failing_s3(monkeypatch):
    """botocore's request retries as a user would set them (the storage layer adds none): few, standard mode."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")


def test_s3_server_restart_mid_ingest_is_survived(tmp_path, s3_env, s3_server, monkeypatch, fast_failing_s3):
    """The server process dies before the 2nd shard upload and comes back: the run waits, retries and completes."""
    bucket, dest = s3_env, f"s3://{s3_env}/ds"
    make_random_images(tmp_path / "src", 10)
    uploads: list[str] = []
    saved: dict = {}
    real_upload = storage.upload_file

    def upload(local, uri):
        uploads.append(str(uri))
        if len(uploads) == 2:  # the server dies right before the 2nd shard upload
            saved["objects"] = _snapshot(s3_server.endpoint_url, bucket)
            s3_server.stop()
        return real_upload(local, uri)

    retries: list[int] = []

    def on_retry(where: str, attempt: int, error: object) -> None:
        # botocore is about to retry the failed request: the server comes back (with the bucket restored, since
        # moto keeps state in memory) before it does, so the retry must succeed; no timer, so no race
        retries.append(attempt)
        if not s3_server.running:
            s3_server.start()
            _restore(s3_server.endpoint_url, bucket, saved["objects"])

    monkeypatch.setattr(storage, "upload_file", upload)
    monkeypatch.setattr(storage, "_on_request_retry", on_retry)
    report = ingest(tmp_path / "src", dest, _cfg(shard_rows=3), num_workers=0)

    assert retries, "the upload never failed: the server was not really stopped"
    assert (report.inputs, report.ingested, report.duplicates, len(report.quarantined)) == (10, 10, 0, 0)
    manifest, rows = read_dataset(dest)
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 3, 1]
    assert {r["sha256"] for r in rows} == {_sha(p) for p in (tmp_path / "src").iterdir()}


def test_s3_failure_exits_nonzero_and_rerun_completes(tmp_path, s3_env, s3_server, monkeypatch, fast_failing_s3):
    """The server dies for good mid-run (botocore's AWS_MAX_ATTEMPTS=3 exhausted: CLI exit 1); after a restart a
    rerun completes exactly."""
    bucket, dest = s3_env, f"s3://{s3_env}/ds"
    make_random_images(tmp_path / "src", 7)
    (tmp_path / "src" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    monkeypatch.chdir(tmp_path)
    snapshot: dict[str, bytes] = {}
    real_upload = storage.upload_file
    uploads: list[str] = []

    def upload(local, uri):
        uploads.append(str(uri))
        if len(uploads) == 2:
            snapshot.update(_snapshot(s3_server.endpoint_url, bucket))
            s3_server.stop()
        return real_upload(local, uri)

    monkeypatch.setattr(storage, "upload_file", upload)
    args = ["ingest", str(tmp_path / "src"), "--dest", dest, "-j", "0", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "data.size=64", "data.shard_rows=3"])
    assert result.exit_code == 1, result.output
    assert "gave up after 3 attempts" in result.output and dest in result.output

    s3_server.start()
    _restore(s3_server.endpoint_url, bucket, snapshot)  # the first shard survives as an orphan; no manifest
    assert [k for k in snapshot if k.startswith("ds/")] == [uploads[0].removeprefix(f"s3://{bucket}/")]
    monkeypatch.setattr(storage, "upload_file", real_upload)
    report = ingest(tmp_path / "src", dest, _cfg(shard_rows=3), num_workers=0)
    assert (report.inputs, report.ingested, report.duplicates, len(report.quarantined)) == (8, 7, 0, 1)
    manifest, rows = read_dataset(dest)
    assert manifest["counts"]["rows"] == 7 and len(rows) == 7
    assert {r["sha256"] for r in rows} == {_sha(p) for p in (tmp_path / "src").glob("rand_*.png")}
    assert [e["source_uri"] for e in load_quarantine(dest)] == [str((tmp_path / "src" / "broken.png").resolve())]


# --- CLI ---------------------------------------------------------------------------------------------------


def test_cli_ingest(bad_image_corpus: ImageCorpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: built-in defaults plus the overrides
    corpus = bad_image_corpus
    dest = tmp_path / "ds"
    args = ["ingest", str(corpus.root), "--dest", str(dest), "-j", "0", "--no-progress"]
    overrides = ["data.size=64", "data.shard_rows=8", f"data.max_image_pixels={corpus.max_pixels}"]
    result = CliRunner().invoke(app, [*args, *overrides])
    assert result.exit_code == 0, result.output
    n_in, n_good, n_bad = len(corpus.all), len(corpus.good), len(corpus.bad)
    assert f"{n_in} inputs: {n_good} ingested, 0 duplicates, {n_bad} quarantined" in result.output
    for path in corpus.bad:
        assert path.name in result.output
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == n_good and manifest["config"]["size"] == 64

    result = CliRunner().invoke(app, [*args, "data.sise=64"])
    assert result.exit_code == 2 and "did you mean 'size'" in result.output
    result = CliRunner().invoke(app, [*args, "data.size=128"])  # dataset built at 64
    assert result.exit_code == 1 and "data.size=128" in result.output


def test_colorfulness_is_measured_on_the_stored_image(tmp_path):
    """The stored colorfulness is that of the resized uint8 RGB (here: a flat image resizes to itself)."""
    src = tmp_path / "src"
    src.mkdir()
    image = random_color_image(3, SIZE, SIZE)
    image.save(src / "x.png")
    ingest(src, tmp_path / "ds", _cfg(), num_workers=0)
    (row,) = read_dataset(str(tmp_path / "ds"))[1]
    expected = colorfulness_np(np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BICUBIC)))
    assert row["colorfulness"] == pytest.approx(expected, rel=1e-5)


# --- fan-out: ingest(map_batches=...) ----------------------------------------------------------------------


def _counts(report) -> tuple[int, int, int, int, list]:
    return report.inputs, report.ingested, report.duplicates, report.skipped, report.quarantined


def test_ingest_fanned_out_to_a_spawned_process_pool_equals_the_local_pool(bad_image_corpus: ImageCorpus, tmp_path):
    """Jobs and outcomes cross a spawn boundary (pickled; the workers import ddcolor afresh); the dataset is the same:
    rows in the same order with the same bytes and splits, same shards, same quarantine; reruns dedup on workers."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    corpus, cfg = bad_image_corpus, _cfg(bad_image_corpus)
    (corpus.root / "copy_of_coffee.png").write_bytes((corpus.root / "coffee.png").read_bytes())
    (corpus.root / "notes.txt").write_text("skipped")
    local = ingest(corpus.root, tmp_path / "local", cfg, num_workers=0)

    calls: list[tuple[str, list]] = []
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:

        def map_batches(fn, jobs):
            calls.append((fn.__name__, jobs))
            return pool.map(fn, jobs)  # results in job order

        mapped = ingest(corpus.root, tmp_path / "mapped", cfg, num_workers=0, map_batches=map_batches, batch_size=3)
        again = ingest(corpus.root, tmp_path / "mapped", cfg, map_batches=map_batches, batch_size=3)

    assert _counts(mapped) == _counts(local) and mapped.balanced
    assert (local.duplicates, local.skipped, len(local.quarantined)) == (1, 1, len(corpus.bad))
    assert dataset_content(str(tmp_path / "mapped")) == dataset_content(str(tmp_path / "local"))
    # run 1: hash jobs of 3 files, then one job per shard (data.shard_rows = 4 unique files); the rerun: the same,
    # but only the bad files (not in the dataset) are decoded again (and quarantined again: no shard)
    assert [name for name, _ in calls] == ["hash_batch", "write_shard", "hash_batch", "write_shard"]
    assert sorted(u for job in calls[3][1] for u, _ in job.items) == sorted(str(p) for p in corpus.bad)
    hash_jobs, shard_jobs = calls[0][1], calls[1][1]
    assert [len(job.uris) for job in hash_jobs][:-1] == [3] * (len(hash_jobs) - 1)
    inputs = sorted(str(p) for p in [*corpus.all, corpus.root / "copy_of_coffee.png"])
    assert [u for job in hash_jobs for u in job.uris] == inputs
    unique = [u for u in inputs if not u.endswith("copy_of_coffee.png")]
    assert [u for job in shard_jobs for u, _ in job.items] == unique and {len(j.items) for j in shard_jobs[:-1]} == {4}
    assert (again.ingested, again.duplicates, again.new_shards) == (0, len(corpus.good) + 1, [])


def _in_order(fn, jobs):
    return [fn(job) for job in jobs]


def _shards_reversed(fn, jobs):
    return _in_order(fn, jobs)[:: -1 if fn.__name__ == "write_shard" else 1]


@pytest.mark.parametrize(
    ("mapper", "message"),
    [
        (lambda fn, jobs: [fn(job) for job in reversed(jobs)], "the result of another batch"),
        (lambda fn, jobs: _in_order(fn, jobs)[:-1], "returned 3 results for 4 batches"),
        (lambda fn, jobs: [*_in_order(fn, jobs), []], "more than the 4 batches"),
        (lambda fn, jobs: [o for outcomes in _in_order(fn, jobs) for o in outcomes], r"not .* \(a list of Hashed\)"),
        (_shards_reversed, "the result of another batch"),
    ],
    ids=["reversed", "one-missing", "one-extra", "flattened", "shards-reversed"],
)
def test_a_mapper_that_breaks_the_order_or_count_is_refused_and_nothing_is_committed(tmp_path, mapper, message):
    make_random_images(tmp_path / "src", 12)  # 4 hash jobs of 3, 3 shard jobs of 4
    dest = tmp_path / "ds"
    with pytest.raises(IngestError, match=message):
        ingest(tmp_path / "src", dest, _cfg(), map_batches=mapper, batch_size=3)
    assert load_manifest(str(dest)) is None


def test_a_mapper_in_this_process_leaves_its_settings_alone(tmp_path, monkeypatch):
    """A thread executor runs jobs in the ingesting process: its environment and torch threads stay as they are
    (the flow trains in that process next), and the result is the local pool's."""
    import torch

    make_random_images(tmp_path / "src", 6)
    local = ingest(tmp_path / "src", tmp_path / "local", _cfg(), num_workers=0)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail(f"torch.set_num_threads({n}) in this process"))
    monkeypatch.setenv("DDCOLOR_MARKER", "kept")
    report = ingest(tmp_path / "src", tmp_path / "mapped", _cfg(), map_batches=_in_order, batch_size=4)
    assert _counts(report) == _counts(local)
    assert dataset_content(str(tmp_path / "mapped")) == dataset_content(str(tmp_path / "local"))
    assert torch.get_num_threads() == threads and os.environ["DDCOLOR_MARKER"] == "kept"


def test_jobs_and_results_pickle_and_dedup_against_the_hash_index(tmp_path):
    import pickle
    from datetime import UTC, datetime

    from ddcolor.data.hash_index import HashIndex, write_hash_index
    from ddcolor.data.ingest_jobs import Hashed, HashJob, ShardJob, hash_batch, origin, write_shard
    from ddcolor.data.prepare import PrepareParams

    (path,) = make_random_images(tmp_path, 1)
    here = origin()  # as from a thread executor: this process is not reconfigured
    job = HashJob((str(path),), None, here)
    assert pickle.loads(pickle.dumps(job)) == job
    (hashed,) = hash_batch(pickle.loads(pickle.dumps(job)))
    assert hashed == Hashed(str(path), _sha(path), known=False) and pickle.loads(pickle.dumps(hashed)) == hashed
    dest = str(tmp_path / "ds")
    index = write_hash_index(dest, HashIndex.from_hex([hashed.sha256, "00" * 32, "ff" * 32]))
    assert hash_batch(HashJob(job.uris, f"{dest}/{index}", here)) == [Hashed(str(path), hashed.sha256, known=True)]

    params = PrepareParams(SIZE, "resize", None, 0.3, 15.0)
    shard = ShardJob(dest, 7, ((str(path), hashed.sha256),), params, datetime(2026, 1, 1, tzinfo=UTC), here)
    result = write_shard(pickle.loads(pickle.dumps(shard)))
    assert pickle.loads(pickle.dumps(result)) == result
    assert result.index == 7 and result.hashes == (hashed.sha256,) and result.quarantined == ()
    assert result.entry["path"].startswith("shards/part-00007-") and result.entry["rows"] == 1
    assert write_shard(shard) == result  # idempotent: a retried job writes the same file under the same name
    path.write_bytes(path.read_bytes() + b"x")  # changed between hashing and writing: rejected, with the reason
    changed = write_shard(shard)
    assert changed.entry is None and "changed while being ingested" in changed.quarantined[0].reason
