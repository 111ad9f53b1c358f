"""Ingestion: raw images (a local folder or ``s3://`` prefix) -> a Lab Parquet shard dataset (local or ``s3://``).

The dataset's layout, manifest and quarantine formats are specified in `ddcolor.data.manifest`.

A run streams the listing of SOURCE in windows of `LIST_WINDOW` files and, per window, fans two kinds of job out to
an executor (`ddcolor.data.ingest_jobs`; the local process pool by default, or ``map_batches``: Dask, Ray, a
Prefect task runner):

1. ``hash_batch`` jobs hash the files and look them up in the dataset's hash index;
2. this process drops duplicates (of the dataset, and earlier in the run: 32 bytes of memory per new image) and
   groups the new files, in input order, into shards of ``data.shard_rows``;
3. ``write_shard`` jobs decode, resize and Lab-encode them and write each shard straight to DEST.

Only hashes and small shard records cross this process (a few hundred bytes per image, whatever the cluster
size); the dataset is the same whichever executor ran the jobs. Last, the commit: ``quarantine.json``, then the
merged hash index and ``manifest.json``, each by optimistic concurrency (`ddcolor.storage.update_bytes`), so two
runs into one dataset at once never lose a shard or double a row.

Re-running on the same source adds nothing and leaves every file untouched; adding images adds only those. Always
``inputs == ingested + duplicates + quarantined``; one bad file never stops a run, an infrastructure failure (S3
unreachable after retries) does, and a rerun then completes it without duplicates (shards written by the failed
run are orphans: never read, removed by ``ddcolor gc``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ddcolor import storage
from ddcolor.config import Config, DataConfig
from ddcolor.data.hash_index import HashIndex, load_hash_index, write_hash_index
from ddcolor.data.ingest_jobs import (
    Hashed,
    HashJob,
    ShardJob,
    ShardResult,
    hash_batch,
    origin,
    upload_shard,
    write_shard,
)
from ddcolor.data.manifest import (
    CONFIG_KEYS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    QUARANTINE_FORMAT,
    QUARANTINE_NAME,
    SHARDS_DIR,
    ManifestError,
    QuarantineEntry,
    build_manifest,
    merge_quarantine,
    orphan_shards,
    parse_manifest,
    read_manifest,
)
from ddcolor.data.prepare import MIN_SIDE, PrepareParams
from ddcolor.data.shards import ShardRow
from ddcolor.errors import DDColorError
from ddcolor.fanout import ProcessPoolMapper, mapper_session, windows
from ddcolor.imageio import IMAGE_EXTENSIONS

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MIN_SIDE",
    "QUARANTINE_NAME",
    "SHARDS_DIR",
    "BatchMapper",
    "IngestError",
    "IngestReport",
    "QuarantineEntry",
    "ingest",
    "load_manifest",
    "load_quarantine",
    "shard_uris",
]

log = logging.getLogger(__name__)

MAP_BATCH = 32  # files per hash job
LIST_WINDOW = 16384  # files listed, hashed and deduplicated before their shards are written (bounds driver memory)

BatchMapper = Callable[[Callable[[Any], Any], list[Any]], Iterable[Any]]
"""``map_batches(fn, jobs)``: run ``fn`` on every job, anywhere; return the results in job order (an iterable,
consumed as it goes). Called with ``hash_batch`` / `HashJob` and ``write_shard`` / `ShardJob`
(`ddcolor.data.ingest_jobs`); a mapper that is a context manager is entered once for the run
(`ddcolor.fanout.mapper_session`)."""


class IngestError(DDColorError):
    """A dataset-level problem: a damaged or incompatible dataset at DEST, or a worker process that died."""


@dataclass
class IngestReport:
    """What one `ingest` run did. ``inputs == ingested + duplicates + len(quarantined)`` always holds.

    Attributes:
        dataset_uri: DEST.
        inputs: image files found under SOURCE (names with an image extension, hidden files excluded).
        ingested: new rows written.
        duplicates: inputs whose content was already in the dataset (or earlier in this run).
        quarantined: the rejected inputs, with reasons.
        new_shards: manifest paths (relative to DEST) of the shards this run added.
        total_rows: rows in the dataset after the run.
        skipped: files under SOURCE that are not counted as inputs (no image extension, or hidden).
        seconds: wall time.
    """

    dataset_uri: str
    inputs: int = 0
    ingested: int = 0
    duplicates: int = 0
    quarantined: list[QuarantineEntry] = field(default_factory=list)
    new_shards: list[str] = field(default_factory=list)
    total_rows: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def balanced(self) -> bool:
        return self.inputs == self.ingested + self.duplicates + len(self.quarantined)

    def summary(self) -> str:
        lines = [
            f"{self.inputs} inputs: {self.ingested} ingested, {self.duplicates} duplicates, "
            f"{len(self.quarantined)} quarantined ({self.seconds:.1f} s)",
            f"dataset: {self.dataset_uri} ({self.total_rows} rows; {len(self.new_shards)} new shards)",
        ]
        if self.skipped:
            lines.append(f"skipped {self.skipped} non-image or hidden files")
        if self.quarantined:
            lines.append(f"quarantined (listed in {storage.join(self.dataset_uri, QUARANTINE_NAME)}):")
            lines.extend(f"  {q.source_uri}: {q.reason}" for q in self.quarantined)
        return "\n".join(lines)


# --- dataset files ---------------------------------------------------------------------------------------


def load_manifest(dest: str) -> dict[str, Any] | None:
    """The manifest of the dataset at ``dest`` (`ddcolor.data.manifest.read_manifest`), or None when there is none
    yet.

    Raises:
        IngestError: a manifest that is not JSON, or of another format or version. StorageError: storage failures.
    """
    try:
        return read_manifest(dest)
    except ManifestError as err:
        if err.missing:
            return None
        raise IngestError(str(err)) from None


def shard_uris(dest: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """Full URIs of the shards the manifest at ``dest`` lists, in order (empty without a manifest)."""
    manifest = load_manifest(dest) if manifest is None else manifest
    return [storage.join(dest, s["path"]) for s in (manifest or {}).get("shards", [])]


def load_quarantine(dest: str) -> list[dict[str, Any]]:
    """The quarantine entries at ``dest`` (empty when there is no quarantine.json)."""
    uri = storage.join(dest, QUARANTINE_NAME)
    try:
        data = storage.read_json(uri)
    except storage.StorageNotFoundError:
        return []
    return list(_checked_quarantine(uri, data).get("entries", []))


# --- the run ---------------------------------------------------------------------------------------------


def _data_config(config: DataConfig | Config | None) -> DataConfig:
    if config is None:
        return DataConfig()
    return config.data if isinstance(config, Config) else config


def _default_workers(cfg: DataConfig) -> int:
    if "num_workers" in cfg.model_fields_set:
        return cfg.num_workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _check_compatible(manifest: dict[str, Any] | None, cfg: DataConfig, dest: str) -> None:
    if manifest is None:
        return
    have = manifest.get("config", {})
    diff = [
        f"data.{k}={getattr(cfg, k)!r} (dataset: {have.get(k)!r})"
        for k in CONFIG_KEYS
        if have.get(k) != getattr(cfg, k)
    ]
    if diff:
        raise IngestError(
            f"{dest} was built with other settings: {', '.join(diff)}. Use a new --dest, or the dataset's settings."
        )


def _iter_inputs(source: str, counts: IngestReport) -> Iterator[str]:
    """Image files under ``source`` in sorted order, streamed; other and hidden files are counted as skipped."""
    # paths as given (not resolved): shards must not record where the repository was checked out
    root = source if storage.is_s3(source) else str(Path(source))
    prefix = root.rstrip("/") + "/"
    for uri in storage.iter_files(root):
        rel = uri[len(prefix) :] if uri.startswith(prefix) else Path(uri).name
        if any(part.startswith(".") for part in rel.split("/")) or Path(rel).suffix.lower() not in IMAGE_EXTENSIONS:
            counts.skipped += 1
            continue
        yield uri


def _shard_hashes(dest: str, manifest: dict[str, Any]) -> HashIndex:
    """The hash index of ``manifest``'s rows, read from its shards (for manifests without ``hash_index``)."""
    import pyarrow.parquet as pq

    hashes: list[str] = []
    for uri in shard_uris(dest, manifest):
        try:
            with storage.open_input_file(uri) as fh:
                hashes += pq.read_table(fh, columns=["sha256"]).column("sha256").to_pylist()
        except storage.StorageNotFoundError:
            raise IngestError(f"{uri}: listed in the manifest but missing; the dataset at {dest} is damaged") from None
        except (OSError, ValueError, KeyError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError OSError
            raise IngestError(
                f"{uri}: unreadable shard ({type(err).__name__}: {err}); the dataset at {dest} is damaged: restore it "
                "(`dvc checkout data/shards`, `dvc pull`) or ingest into a new destination"
            ) from None
    return HashIndex.from_hex(hashes)


def _hash_index(dest: str, manifest: dict[str, Any] | None) -> tuple[HashIndex, str | None]:
    """(the index of ``manifest``'s rows, its path relative to ``dest``; None for an empty dataset). A manifest
    without one (or whose file is gone) gets it rebuilt from its shards and written (content-named, once)."""
    if not manifest or not manifest.get("shards"):
        return HashIndex.from_hex([]), None
    relative = manifest.get("hash_index")
    if isinstance(relative, str):
        uri = storage.join(dest, relative)
        if storage.exists(uri):  # checked here: workers will read it (this process may hold a cached copy)
            index = load_hash_index(uri)
            if len(index) == sum(int(s.get("rows", 0)) for s in manifest["shards"]):
                return index, relative
            log.warning("%s does not match the manifest's row count; rebuilding it", uri)
        else:
            log.warning("%s is gone; rebuilding the hash index from the shards", uri)
    index = _shard_hashes(dest, manifest)
    return index, write_hash_index(dest, index)


def _checked(results: Iterable[Any], jobs: list[Any], expect: type, identity: Callable[[Any], Any]) -> Iterator[Any]:
    """The mapper's results, checked: one per job, in job order (``identity(job) == identity(result)``), of the
    function's own result type ``expect`` (a list of it for hash jobs); else IngestError."""
    done = 0
    try:
        for result in results:
            if done == len(jobs):
                raise IngestError(f"map_batches returned more than the {len(jobs)} batches it was given")
            listed = expect is Hashed
            items = result if listed and isinstance(result, list | tuple) else [result]
            if (listed and not isinstance(result, list | tuple)) or not all(isinstance(r, expect) for r in items):
                raise IngestError(
                    f"map_batches returned, as batch {done}, a {type(result).__name__} that is not what the function "
                    f"returns ({'a list of ' if listed else ''}{expect.__name__}): a mapper must return one result "
                    "per batch, the function's own, in batch order"
                )
            if identity(result) != identity(jobs[done]):
                raise IngestError(
                    f"map_batches returned, as batch {done} of {len(jobs)}, the result of another batch: a mapper "
                    "must return one result per batch, in batch order"
                )
            yield result
            done += 1
        if done != len(jobs):
            raise IngestError(f"map_batches returned {done} results for {len(jobs)} batches")
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()  # a generator mapper stops its executor now


def _uris(job_or_result: HashJob | list[Hashed]) -> tuple[str, ...]:
    return job_or_result.uris if isinstance(job_or_result, HashJob) else tuple(h.uri for h in job_or_result)


@dataclass
class _Run:
    """The state of one ingest run in the driver: what is pending a shard, and what was written."""

    dest: str
    cfg: DataConfig
    params: PrepareParams
    mapper: BatchMapper
    batch_size: int
    known_index: str | None
    first_shard: int
    ingested_at: datetime
    report: IngestReport
    bar: Any
    seen: set[bytes] = field(default_factory=set)  # sha256 digests of the new content of this run
    pending: list[tuple[str, str]] = field(default_factory=list)  # (uri, sha256) waiting for a shard
    results: list[ShardResult] = field(default_factory=list)

    def hash_window(self, uris: list[str]) -> None:
        """Phase 1 and dedup for one window of inputs; unique new files join ``pending``."""
        driver = origin()
        jobs = [
            HashJob(tuple(uris[i : i + self.batch_size]), self.known_index, driver)
            for i in range(0, len(uris), self.batch_size)
        ]
        results = _checked(self.mapper(hash_batch, jobs), jobs, Hashed, _uris)
        with contextlib.closing(results):
            for hashed in results:
                for h in hashed:
                    self.report.inputs += 1
                    if h.sha256 is None:
                        self._quarantine(QuarantineEntry(h.uri, None, h.reason))
                        self.bar.update(1)
                        continue
                    digest = bytes.fromhex(h.sha256)
                    if h.known or digest in self.seen:
                        self.report.duplicates += 1
                        log.debug("duplicate: %s (%s)", h.uri, h.sha256)
                        self.bar.update(1)
                        continue
                    self.seen.add(digest)
                    self.pending.append((h.uri, h.sha256))

    def write_shards(self, final: bool) -> None:
        """Phase 2: full shards of ``pending`` (and the rest too when ``final``)."""
        rows = self.cfg.shard_rows
        cut = len(self.pending) if final else len(self.pending) - len(self.pending) % rows
        if cut == 0:
            return
        batch, self.pending = self.pending[:cut], self.pending[cut:]
        driver = origin()
        jobs = []
        for i in range(0, len(batch), rows):
            index = self.first_shard + len(self.results) + len(jobs)
            items = tuple(batch[i : i + rows])
            jobs.append(ShardJob(self.dest, index, items, self.params, self.ingested_at, driver))
        results = _checked(self.mapper(write_shard, jobs), jobs, ShardResult, lambda r: r.index)
        with contextlib.closing(results):
            for job, result in zip(jobs, results, strict=False):
                self.results.append(result)
                self.report.ingested += len(result.hashes)
                for entry in result.quarantined:
                    self._quarantine(entry)
                self.bar.update(len(job.items))

    def _quarantine(self, entry: QuarantineEntry) -> None:
        self.report.quarantined.append(entry)
        log.warning("quarantined %s: %s", entry.source_uri, entry.reason)


def ingest(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str] | None = None,
    config: DataConfig | Config | None = None,
    *,
    num_workers: int | None = None,
    progress: bool = False,
    map_batches: BatchMapper | None = None,
    batch_size: int | None = None,
) -> IngestReport:
    """Ingest the images under ``source`` into the shard dataset at ``dest`` (incremental, idempotent).

    Args:
        source: a local folder or ``s3://bucket/prefix``; searched recursively for image extensions
            (jpg, jpeg, png, webp, tif, tiff, bmp, ...), hidden files and folders excluded.
        dest: a local folder or ``s3://bucket/prefix``; default ``data.shards_uri``.
        config: the data settings (`DataConfig` or the whole `Config`); default: built-in defaults. Uses size,
            resize_mode, val_fraction, shard_rows, min_colorfulness, max_image_pixels, num_workers.
        num_workers: worker processes of the local pool; 0 = this process. Default: ``data.num_workers`` when the
            config sets it explicitly, else all available cores. Not used with ``map_batches``.
        progress: show a tqdm progress bar.
        map_batches: run the jobs on this executor instead of the local process pool (`BatchMapper`; e.g.
            `ddcolor.fanout.TaskRunnerMapper` on Dask or Ray). The dataset is the same as with the local pool.
        batch_size: files per hash job; default `MAP_BATCH`. (A shard job holds ``data.shard_rows`` files.)

    Returns:
        The `IngestReport` (quarantined files included; they are also in DEST's quarantine.json).

    Raises:
        IngestError: DEST holds a dataset built with another size/resize_mode/val_fraction/min_colorfulness, or is
            damaged; ``map_batches`` returned results out of order or a wrong number of them.
        ddcolor.fanout.WorkerDiedError: a local worker process died.
        ValueError: ``batch_size`` < 1.
        StorageError: SOURCE or DEST unreachable (after retries), missing, or access denied. Nothing is committed
            then (no manifest change); shards already uploaded are orphans, and a rerun completes the dataset.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    started = time.monotonic()
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: need at least 1 file per batch")
    cfg = _data_config(config)
    source, dest = str(source), str(dest if dest is not None else cfg.shards_uri)
    if not storage.is_s3(dest):
        dest = str(Path(dest).resolve())
    workers = _default_workers(cfg) if num_workers is None else num_workers
    mapper = map_batches if map_batches is not None else ProcessPoolMapper(workers)

    manifest = load_manifest(dest)
    _check_compatible(manifest, cfg, dest)
    base_index, base_index_path = _hash_index(dest, manifest)
    orphans = orphan_shards(dest, manifest)
    if orphans:
        log.warning(
            "%d shard files under %s are not in the manifest (left by an interrupted or a running ingest) and are "
            "ignored; `ddcolor gc %s` removes them once they are old enough",
            len(orphans),
            storage.join(dest, SHARDS_DIR),
            dest,
        )
    old_shards = list((manifest or {}).get("shards", []))
    log.info(
        "ingest %s -> %s: dataset has %d rows in %d shards; jobs run on %s",
        source,
        dest,
        len(base_index),
        len(old_shards),
        mapper if map_batches is None else _name(map_batches),
    )
    report = IngestReport(dataset_uri=dest)
    bar = tqdm(unit="img", desc="ingest", disable=not progress, dynamic_ncols=True)
    run = _Run(
        dest=dest,
        cfg=cfg,
        params=PrepareParams(cfg.size, cfg.resize_mode, cfg.max_image_pixels, cfg.val_fraction, cfg.min_colorfulness),
        mapper=mapper,
        batch_size=batch_size or MAP_BATCH,
        known_index=storage.join(dest, base_index_path) if base_index_path else None,
        first_shard=len(old_shards),
        ingested_at=datetime.now(UTC),
        report=report,
        bar=bar,
    )
    with bar, logging_redirect_tqdm() if progress else contextlib.nullcontext():
        inputs = _iter_inputs(source, report)
        with mapper_session(mapper):
            listed = 0
            for window, last in windows(inputs, LIST_WINDOW):
                listed += len(window)
                if last:  # the listing is complete: the bar gets its total
                    bar.total = listed
                    bar.refresh()
                run.hash_window(window)
                run.write_shards(final=last)
    if not report.inputs:
        log.warning("no image files under %s (extensions: %s)", source, ", ".join(sorted(IMAGE_EXTENSIONS)))

    _commit(run, manifest)
    report.seconds = time.monotonic() - started
    assert report.balanced, report  # an invariant of the bookkeeping above, not a check of input
    log.info(
        "ingest done: %d inputs = %d ingested + %d duplicates + %d quarantined; %d rows in %s",
        report.inputs,
        report.ingested,
        report.duplicates,
        len(report.quarantined),
        report.total_rows,
        dest,
    )
    return report


def _name(obj: object) -> str:
    return getattr(obj, "__qualname__", None) or repr(obj)


# --- the commit ------------------------------------------------------------------------------------------


def _commit(run: _Run, base: dict[str, Any] | None) -> None:
    """Quarantine first, then the hash index and the manifest last, each merged with whatever another run committed
    meanwhile (`ddcolor.storage.update_bytes`); rows another run committed first are dropped from this run's shards.
    """
    dest, report = run.dest, run.report
    written = {h for result in run.results for h in result.hashes}

    def change_quarantine(current: bytes | None) -> bytes | None:
        existing = _parse_quarantine(dest, current)
        merged = merge_quarantine(existing, report.quarantined, written, run.ingested_at)
        return None if existing is not None and merged == existing else storage.json_bytes(merged)

    storage.update_bytes(storage.join(dest, QUARANTINE_NAME), change_quarantine)

    base_paths = {s["path"] for s in (base or {}).get("shards", [])}

    def change_manifest(current_bytes: bytes | None) -> bytes | None:
        current = _parse_manifest(dest, current_bytes)
        if base is not None and current is None:
            raise IngestError(f"{storage.join(dest, MANIFEST_NAME)}: removed while this ingest ran; rerun it")
        _check_compatible(current, run.cfg, dest)
        shards = list((current or {}).get("shards", []))
        if current is not None and all(r.entry is None for r in run.results):
            return None  # nothing to add: the manifest stays byte for byte
        index, _ = _hash_index(dest, current)
        if any(s["path"] not in base_paths for s in shards):  # another run committed meanwhile
            _drop_rows_committed_by_others(run, index)
        entries = [r.entry for r in run.results if r.entry is not None]
        if current is not None and not entries:
            return None  # everything was committed by the other run
        ours = HashIndex.from_hex(h for r in run.results if r.entry is not None for h in r.hashes)
        relative = write_hash_index(dest, index.union(ours)) if len(index) + len(ours) else None
        return storage.json_bytes(build_manifest(run.cfg.model_dump(), shards + entries, relative))

    final = _parse_manifest(dest, storage.update_bytes(storage.join(dest, MANIFEST_NAME), change_manifest)) or {}
    ours = {r.entry["path"] for r in run.results if r.entry is not None}
    report.new_shards = [s["path"] for s in final.get("shards", []) if s["path"] in ours]
    report.total_rows = sum(s["rows"] for s in final.get("shards", []))


def _parse_manifest(dest: str, data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        return parse_manifest(data, storage.join(dest, MANIFEST_NAME))
    except ManifestError as err:
        raise IngestError(str(err)) from None


def _parse_quarantine(dest: str, data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    uri = storage.join(dest, QUARANTINE_NAME)
    try:
        parsed = json.loads(data)
    except ValueError as err:
        raise IngestError(f"{uri}: not JSON ({err})") from None
    return _checked_quarantine(uri, parsed)


def _checked_quarantine(uri: str, parsed: Any) -> dict[str, Any]:
    if not isinstance(parsed, dict) or parsed.get("format") != QUARANTINE_FORMAT:
        raise IngestError(f"{uri}: not a {QUARANTINE_FORMAT} file")
    return parsed


def _drop_rows_committed_by_others(run: _Run, committed: HashIndex) -> None:
    """Rewrite this run's shards without the rows whose content is in ``committed`` (the index of the manifest
    another run committed meanwhile; those rows count as duplicates then); a shard left empty is dropped. The
    replaced files are this run's own, never listed: deleted."""
    import pyarrow.parquet as pq

    for i, result in enumerate(run.results):
        overlap = {h for h in result.hashes if h in committed}
        if result.entry is None or not overlap:
            continue
        old_uri = storage.join(run.dest, result.entry["path"])
        with storage.open_input_file(old_uri) as fh:
            table = pq.read_table(fh)
        fields = ("sha256", "source_uri", "split", "L", "ab", "colorfulness", "low_colorfulness")
        kept = (ShardRow(*(r[f] for f in fields)) for r in table.to_pylist() if r["sha256"] not in overlap)
        number = int(result.entry["path"].split("-")[1])  # shards/part-<number>-<hash8>.parquet
        entry, hashes = upload_shard(run.dest, number, kept, run.cfg.size, run.ingested_at)
        storage.delete(old_uri)
        run.results[i] = ShardResult(result.index, entry, hashes, result.quarantined)
        run.report.ingested -= len(overlap)
        run.report.duplicates += len(overlap)
        log.info(
            "%d rows of %s were committed by another ingest meanwhile: dropped (counted as duplicates)",
            len(overlap),
            old_uri,
        )
