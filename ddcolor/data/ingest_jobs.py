"""The units of work an ingest run fans out: hash a batch of files, then write one shard. They run anywhere.

`ddcolor.data.ingest.ingest` maps them over any executor (`ddcolor.fanout`: a local process pool, Dask, Ray):

1. ``hash_batch(HashJob)``: read each file, sha256 its bytes, and look the hash up in the dataset's hash index
   (`ddcolor.data.hash_index`; the job names its URI). Returns ~100 bytes per file.
2. The driver drops duplicates (of the dataset, and within the run) and groups the unique files into shards.
3. ``write_shard(ShardJob)``: read, decode, resize and Lab-encode each file (`ddcolor.data.prepare`), write one
   Parquet shard straight to ``DEST/shards/`` and return a small `ShardResult` (the manifest entry, the hashes
   written, the files rejected). Images never travel through the driver.

A job is self-contained and picklable, and holds no credential: a worker reads storage with its own environment
(``AWS_*`` / its role). Its size does not grow with the dataset. Both functions are idempotent: a shard's bytes
depend only on its job, so a retried job (a worker lost mid-task) writes the same file under the same name, and a
shard that no commit lists is an orphan that readers ignore and ``ddcolor gc`` removes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ddcolor import storage
from ddcolor.data.hash_index import load_hash_index
from ddcolor.data.manifest import SHARDS_DIR, QuarantineEntry
from ddcolor.data.prepare import PreparedRow, PrepareParams, prepare_row
from ddcolor.data.shards import ShardRow, split_for, write_shard_file
from ddcolor.fanout import use_one_torch_thread

__all__ = [
    "HashJob",
    "Hashed",
    "ShardJob",
    "ShardResult",
    "file_sha256",
    "hash_batch",
    "origin",
    "upload_shard",
    "write_shard",
]

log = logging.getLogger(__name__)

READ_CHUNK = 8  # files read at once by a job (remote: concurrently); bounds a worker's memory to 8 files


def origin() -> str:
    """``host:pid`` of this process (a job records the driver's, so that a worker knows it is not the driver)."""
    return f"{socket.gethostname()}:{os.getpid()}"


_configure_worker_process = functools.cache(use_one_torch_thread)  # once per worker process


def _enter(job_origin: str) -> None:
    if job_origin != origin():  # a thread executor in the driver changes nothing in the driver
        _configure_worker_process()


def _read_all(uris: tuple[str, ...]) -> list[tuple[str, bytes | storage.StorageError]]:
    """(uri, bytes or the read error) in order, `READ_CHUNK` files at a time (remote ones concurrently).

    Raises:
        StorageError: an ``s3://`` input unreachable after retries (infrastructure: the task fails; a rerun of the
            task or of the run completes it). A missing object or any local read failure is returned instead.
    """
    out: list[tuple[str, bytes | storage.StorageError]] = []
    for first in range(0, len(uris), READ_CHUNK):
        chunk = uris[first : first + READ_CHUNK]
        for uri, data in zip(chunk, storage.read_many(chunk, errors="return"), strict=True):
            remote_failure = storage.is_remote(uri) and not isinstance(data, bytes | storage.StorageNotFoundError)
            if remote_failure:
                raise data
            out.append((uri, data))
    return out


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a local file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- phase 1: hash ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HashJob:
    """Files to hash, and the dataset's hash index to look them up in.

    Attributes:
        uris: the inputs, in input order. known_index: URI of the dataset's hash index (None: an empty dataset).
        origin: ``host:pid`` of the driver (`origin`).
    """

    uris: tuple[str, ...]
    known_index: str | None
    origin: str


@dataclass(frozen=True)
class Hashed:
    """What phase 1 learned about one input (``uri``): its sha256 (None: unreadable, ``reason`` says why) and
    whether the dataset already holds that content."""

    uri: str
    sha256: str | None
    known: bool = False
    reason: str = ""


def hash_batch(job: HashJob) -> list[Hashed]:
    """sha256 of each file of ``job``, looked up in the dataset's hash index. One `Hashed` per URI, in order.

    Raises:
        StorageError: an ``s3://`` input or the index unreachable after retries.
    """
    _enter(job.origin)
    known = load_hash_index(job.known_index) if job.known_index else None
    out = []
    for uri, data in _read_all(job.uris):
        if isinstance(data, storage.StorageError):
            out.append(Hashed(uri, None, reason=f"cannot read: {data.reason}"))
            continue
        sha = hashlib.sha256(data).hexdigest()
        out.append(Hashed(uri, sha, known=known is not None and sha in known))
    return out


# --- phase 2: write a shard ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its inputs (unique content, in row order) and how to prepare them.

    Attributes:
        dest: the dataset. index: the shard's number in its file name (``part-<index>-<hash8>.parquet``).
        items: ``(uri, sha256)`` per input, the hash from phase 1. params: sizes, limits, split fraction.
        ingested_at: the run's timestamp (stored in every row). origin: the driver's ``host:pid``.
    """

    dest: str
    index: int
    items: tuple[tuple[str, str], ...]
    params: PrepareParams
    ingested_at: datetime
    origin: str


@dataclass(frozen=True)
class ShardResult:
    """What `write_shard` did (small: it travels back to the driver).

    Attributes:
        index: the job's shard number. entry: the manifest entry of the shard written (path relative to DEST,
            rows, bytes, sha256, splits, low_colorfulness), or None when no input made a row.
        hashes: sha256 of the rows, in row order.
        quarantined: the inputs rejected (undecodable, too small, changed since phase 1), with reasons.
    """

    index: int
    entry: dict[str, Any] | None
    hashes: tuple[str, ...]
    quarantined: tuple[QuarantineEntry, ...]


def write_shard(job: ShardJob) -> ShardResult:
    """Prepare ``job``'s inputs and upload them as one shard to ``DEST/shards/part-<index>-<hash8>.parquet``.

    Raises:
        StorageError: an ``s3://`` input or DEST unreachable after retries (nothing is committed by a task; the
            run fails and a rerun completes the dataset).
    """
    _enter(job.origin)
    params = job.params
    rejected: list[QuarantineEntry] = []

    def rows() -> Iterator[ShardRow]:
        for (uri, expected), (_, data) in zip(job.items, _read_all(tuple(u for u, _ in job.items)), strict=True):
            if isinstance(data, storage.StorageError):
                rejected.append(QuarantineEntry(uri, expected, f"cannot read: {data.reason}"))
                continue
            if hashlib.sha256(data).hexdigest() != expected:
                rejected.append(QuarantineEntry(uri, expected, "changed while being ingested; rerun to ingest it"))
                continue
            row = prepare_row(data, uri, params)
            if not isinstance(row, PreparedRow):
                rejected.append(QuarantineEntry(uri, expected, row))
                continue
            split = split_for(expected, params.val_fraction)
            low = row.colorfulness < params.min_colorfulness
            yield ShardRow(expected, uri, split, row.L, row.ab, row.colorfulness, low)

    entry, hashes = upload_shard(job.dest, job.index, rows(), params.size, job.ingested_at)
    return ShardResult(job.index, entry, hashes, tuple(rejected))


def upload_shard(
    dest: str, index: int, rows: Iterable[ShardRow], size: int, ingested_at: datetime
) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
    """Write ``rows`` as one shard (`ddcolor.data.shards.write_shard_file`) to ``DEST/shards/part-<index>-<hash8>
    .parquet``. Returns (its manifest entry, the rows' sha256 in order); (None, ()) when there is no row."""
    hashes: list[str] = []
    splits = {"train": 0, "val": 0}
    low = 0

    def counted() -> Iterator[ShardRow]:
        nonlocal low
        for row in rows:
            hashes.append(row.sha256)
            splits[row.split] += 1
            low += int(row.low_colorfulness)
            yield row

    with tempfile.TemporaryDirectory(prefix="ddcolor-shard-") as tmp:
        path = Path(tmp) / "shard.parquet"
        written = write_shard_file(path, counted(), size, ingested_at)
        if not written:
            return None, ()
        digest = file_sha256(path)
        relative = f"{SHARDS_DIR}/part-{index:05d}-{digest[:8]}.parquet"
        storage.upload_file(path, storage.join(dest, relative))
        entry = {
            "path": relative,
            "rows": written,
            "bytes": path.stat().st_size,
            "sha256": digest,
            "splits": splits,
            "low_colorfulness": low,
        }
    log.info("wrote %s (%d rows)", storage.join(dest, relative), written)
    return entry, tuple(hashes)
