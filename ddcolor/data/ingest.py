"""Ingestion: raw images (a local folder or ``s3://`` prefix) -> a Lab Parquet shard dataset (local or ``s3://``).

The dataset's layout, manifest and quarantine formats are specified in `ddcolor.data.manifest`.

Each run: list SOURCE, hash every file (sha256 of its bytes), skip content already in DEST's shards or earlier in
this run (duplicates), decode the rest in a process pool (EXIF orientation, ICC -> sRGB via `ddcolor.imageio`),
resize (``data.resize_mode``), encode Lab, and append new shards. Re-running on the same source adds nothing and
leaves every file untouched; adding images adds only those. Always ``inputs == ingested + duplicates +
quarantined``; one bad file never stops a run, an infrastructure failure (S3 unreachable after retries) does,
and a rerun then completes it without duplicates.

Fan-out: ``ingest(..., map_batches=...)`` replaces the local process pool with any executor (a Prefect task runner,
Dask, Ray, ``concurrent.futures``): it is handed `prepare_batch` and a list of `BatchJob` (picklable, a few hundred
bytes whatever the dataset size: URIs, settings and the URI of the dataset's sorted hash index under
``DEST/hash-index/``; no credential: workers use their own environment) and must return one ``list[Outcome]`` per
job, in job order. Hashing, dedup against the
dataset, decoding and encoding run on the workers; dedup within the run, splits, shards, manifest and quarantine stay
in the calling process, so the dataset is the same whichever executor ran the batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import socket
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ddcolor import storage
from ddcolor.color import CF_MEAN_WEIGHT
from ddcolor.config import Config, DataConfig
from ddcolor.data.lab_lut import LabEncoder
from ddcolor.data.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    QUARANTINE_FORMAT,
    QUARANTINE_NAME,
    SHARDS_DIR,
    ManifestError,
    orphan_shards,
    read_manifest,
)
from ddcolor.data.shards import SHARD_SCHEMA, split_for
from ddcolor.errors import DDColorError
from ddcolor.imageio import IMAGE_EXTENSIONS, ImageReadError, read_image, read_rgb8_image, to_uint

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MIN_SIDE",
    "QUARANTINE_NAME",
    "SHARDS_DIR",
    "BatchJob",
    "BatchMapper",
    "HashIndex",
    "IngestError",
    "IngestReport",
    "Outcome",
    "PrepareParams",
    "QuarantineEntry",
    "decode_image_bytes",
    "ingest",
    "load_manifest",
    "load_quarantine",
    "prepare_batch",
    "prepare_image",
    "shard_uris",
    "write_hash_index",
]

log = logging.getLogger(__name__)

MIN_SIDE = 32  # px: inputs smaller than this on either side (after EXIF rotation) are quarantined
ROW_GROUP_ROWS = 64  # rows per Parquet row group: small enough to stream, large enough to compress
TASK_BATCH = 4  # files per task sent to a worker process of the local pool
MAP_BATCH = 32  # files per `BatchJob` handed to a `map_batches` executor
HASH_INDEX_DIR = "hash-index"  # sorted sha256 digests of a dataset version, read by fan-out workers (`BatchJob`)
_CONFIG_KEYS = ("size", "resize_mode", "val_fraction", "min_colorfulness")


class IngestError(DDColorError):
    """A dataset-level problem: a damaged or incompatible dataset at DEST, or a worker process that died."""


@dataclass(frozen=True)
class QuarantineEntry:
    """An input that was not ingested, and why."""

    source_uri: str
    sha256: str | None
    reason: str


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


# --- image preparation -----------------------------------------------------------------------------------


def _ingest_reason(reason: str) -> str:
    """imageio's reasons mention the colorize CLI's --max-pixels; here the knob is data.max_image_pixels."""
    return reason.replace("Raise --max-pixels (0 = no limit)", "Raise data.max_image_pixels (null = no limit)").replace(
        "--max-pixels limit", "data.max_image_pixels limit"
    )


def decode_image_bytes(data: bytes, name: str, max_pixels: int | None) -> np.ndarray:
    """Decode image file bytes exactly like `ddcolor.imageio.read_image` (EXIF orientation, ICC -> sRGB).

    Args:
        data: the file content. name: its name (for the extension and messages). max_pixels: bomb guard.

    Returns:
        float32 (H, W, 3) sRGB in [0, 1], upright.

    Raises:
        ImageReadError: with the same reasons as `read_image`.
    """
    suffix = Path(name).suffix if Path(name).suffix.lower() in IMAGE_EXTENSIONS else ".img"
    with tempfile.TemporaryDirectory(prefix="ddcolor-decode-") as tmp:
        path = Path(tmp) / f"input{suffix}"
        path.write_bytes(data)
        try:
            return read_image(path, max_pixels).rgb
        except ImageReadError as err:
            raise ImageReadError(name, err.reason) from None


def prepare_image(rgb: np.ndarray | Image.Image, size: int, resize_mode: str) -> np.ndarray:
    """float or uint8 (H, W, 3) sRGB (float in [0, 1]), or an RGB PIL image -> uint8 (size, size, 3) sRGB.

    ``resize``: direct resize to size x size (the official recipe; aspect ratio not kept). ``center_crop``: the
    short side to ``size`` (aspect kept), then the central size x size square. Antialiased bicubic resampling.
    """
    if isinstance(rgb, Image.Image):
        im = rgb
    else:
        im = Image.fromarray(to_uint(rgb, 8), mode="RGB") if rgb.dtype != np.uint8 else Image.fromarray(rgb)
    width, height = im.size
    if resize_mode == "resize":
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    elif resize_mode == "center_crop":
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    else:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; use 'resize' or 'center_crop'")
    return np.array(im, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)


def colorfulness_u8(img: np.ndarray) -> float:
    """`ddcolor.color.colorfulness_np` of a uint8 (H, W, 3) RGB image in one integer pass (same value to ~1e-12).

    rg = |R - G| and 2 yb = |R + G - 2B| are small integers, so their sums and sums of squares are exact; mean and
    population variance follow from them with one rounding each (Python integers), instead of two-pass float64
    statistics.
    """
    pixels = img.reshape(-1, 3).astype(np.int32)
    rg = np.abs(pixels[:, 0] - pixels[:, 1])
    yb2 = np.abs(pixels[:, 0] + pixels[:, 1] - 2 * pixels[:, 2])  # 2 * yb
    n = rg.size
    # squares fit int32 (<= 510^2), sums are taken in int64; no BLAS (its threads spin on a busy machine)
    s_rg, s_yb2 = int(rg.sum(dtype=np.int64)), int(yb2.sum(dtype=np.int64))
    q_rg, q_yb2 = int((rg * rg).sum(dtype=np.int64)), int((yb2 * yb2).sum(dtype=np.int64))
    # n^2 var = n sum(x^2) - sum(x)^2, exactly; yb = yb2 / 2, so its moments take a factor 4
    var = (n * q_rg - s_rg * s_rg) / n**2 + (n * q_yb2 - s_yb2 * s_yb2) / (4 * n**2)
    mean2 = (s_rg / n) ** 2 + (s_yb2 / (2 * n)) ** 2
    return float(np.sqrt(var) + CF_MEAN_WEIGHT * np.sqrt(mean2))


#: JPEG draft decoding (`ddcolor.imageio.read_rgb8`: 1/2, 1/4 or 1/8 scale in the DCT domain, keeping >= this
#: factor x the target side) is OFF (0): measured on 2048- and 4000-px JPEGs to 256 px it is 3-10x faster, but moves
#: stored values by up to 1.2 L* and 3 ab (mean 0.06 L*, 0.15 ab), more than the shard quantisation tolerance
#: (0.2 L*, 0.5 ab) that ingestion promises relative to a full decode. 2 is the setting that was measured.
DRAFT_FACTOR = 0
#: this process's shard Lab encoder: `encode_lab` bytes, by table look-up once enough images were encoded.
_ENCODE_LAB = LabEncoder()


# --- per-file work (runs in worker processes) -------------------------------------------------------------


@dataclass(frozen=True)
class PrepareParams:
    """How a worker prepares an image: the output side (px), ``data.resize_mode`` and the decode bomb guard."""

    size: int
    resize_mode: str
    max_pixels: int | None


@dataclass(frozen=True)
class Outcome:
    """What became of one input (picklable: it crosses process and cluster boundaries).

    Attributes:
        kind: ``"row"`` (L, ab, colorfulness set), ``"duplicate"`` (content already in the dataset) or
            ``"quarantine"`` (reason set).
        uri: the input. sha256: of its bytes (None when it could not be read).
        L, ab: `ddcolor.data.shards.encode_lab` of the prepared (size, size) image. colorfulness: of that image.
    """

    kind: str
    uri: str
    sha256: str | None = None
    reason: str = ""
    L: bytes = b""
    ab: bytes = b""
    colorfulness: float = 0.0


@dataclass(frozen=True)
class BatchJob:
    """One batch of inputs for `prepare_batch`, with everything a worker needs (picklable, self-contained).

    Its size does not grow with the dataset, and it holds no credential: a worker reads storage with the settings
    of its own environment (``AWS_*`` / its role), and the known hashes from the index file the job names.

    Attributes:
        uris: the inputs, in input order.
        params: how to prepare them.
        known_index: URI of the sorted hash index of the images already in the dataset (`write_hash_index`; those
            are reported as duplicates without decoding), or None for an empty dataset. Each worker process loads it
            once (cached by URI: the name holds its content hash).
        run_id: identifies the `ingest` run: a worker process configures itself once per run.
        origin: ``host:pid`` of the process that runs `ingest`; a job run there (a thread executor) changes nothing
            in the process (its torch threads are left alone).
    """

    uris: tuple[str, ...]
    params: PrepareParams
    known_index: str | None
    run_id: str
    origin: str


BatchMapper = Callable[[Callable[[BatchJob], list[Outcome]], list[BatchJob]], Iterable[list[Outcome]]]
"""``map_batches(prepare_batch, jobs)``: run ``prepare_batch`` on every job, anywhere; return the results in job
order (an iterable, consumed as it goes: a generator keeps memory bounded)."""

_STATE: dict[str, Any] = {}


def _configure(params: PrepareParams, known: frozenset[str]) -> None:
    _STATE["params"] = params
    _STATE["known"] = known


_ENV_PREFIXES = ("AWS_", "DDCOLOR_")


def _storage_env() -> dict[str, str]:
    """The environment that storage reads (endpoint, credentials, retries), to hand to worker processes."""
    return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}


def _use_env(env: dict[str, str]) -> None:
    """Make this worker process read storage settings ``env`` (and use one torch thread)."""
    # A forkserver child inherits the environment of the moment the server started, not of now: use the parent's.
    for name in [k for k in os.environ if k.startswith(_ENV_PREFIXES) and k not in env]:
        del os.environ[name]
    os.environ.update(env)
    _one_torch_thread()


def _one_torch_thread() -> None:
    try:
        import torch

        torch.set_num_threads(1)  # one process per core already
    except Exception:  # pragma: no cover
        pass


class HashIndex:
    """Membership in a sorted array of sha256 digests (32 bytes each): 32 MB per million rows, binary search."""

    def __init__(self, digests: np.ndarray) -> None:
        self.digests = digests

    def __len__(self) -> int:
        return len(self.digests)

    def __contains__(self, sha256_hex: object) -> bool:
        if not isinstance(sha256_hex, str):
            return False
        digest = np.array([bytes.fromhex(sha256_hex)], dtype="S32")
        i = int(np.searchsorted(self.digests, digest[0]))
        # array vs array: numpy drops trailing NUL bytes of S32 elements on both sides alike (not so for scalars)
        return i < len(self.digests) and bool(self.digests[i : i + 1] == digest)


def write_hash_index(dest: str, known: Iterable[str]) -> str:
    """Write the sorted digests of ``known`` (hex sha256) to ``DEST/hash-index/<sha256 of the file>[:16].bin``
    (once: an existing file of that name holds the same content) and return its URI, for `BatchJob.known_index`.
    """
    digests = np.sort(np.array([bytes.fromhex(h) for h in known], dtype="S32"))
    data = digests.tobytes()
    uri = storage.join(dest, HASH_INDEX_DIR, f"{hashlib.sha256(data).hexdigest()[:16]}.bin")
    if not storage.exists(uri):
        storage.write_bytes(uri, data)
    return uri


def _load_hash_index(uri: str) -> HashIndex:
    """The index at ``uri``, read once per process (the name holds its content hash, so a cached copy is current)."""
    cached = _STATE.get("hash_index")
    if cached is None or cached[0] != uri:
        digests = np.frombuffer(storage.read_bytes(uri), dtype="S32")
        cached = _STATE["hash_index"] = (uri, HashIndex(digests))
    return cached[1]


def _init_worker(params: PrepareParams, known: frozenset[str], env: dict[str, str]) -> None:
    _use_env(env)
    _configure(params, known)


def _origin() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process(uri: str, params: PrepareParams, known: frozenset[str]) -> Outcome:
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as err:
        if storage.is_s3(uri) and not isinstance(err, storage.StorageNotFoundError):
            raise  # infrastructure: stop the run (a rerun completes it)
        return Outcome("quarantine", uri, reason=f"cannot read: {err.reason}")
    sha = hashlib.sha256(data).hexdigest()
    if sha in known:
        return Outcome("duplicate", uri, sha)
    try:
        # straight from the bytes already read (hashed) to 8-bit sRGB: no second read, no float32 copy
        rgb = read_rgb8_image(data, uri, params.max_pixels, draft_side=DRAFT_FACTOR * params.size)
        width, height = rgb.size
        if min(height, width) < MIN_SIDE:
            return Outcome(
                "quarantine", uri, sha, reason=f"too small: {width}x{height} px; need at least {MIN_SIDE} px a side"
            )
        img = prepare_image(rgb, params.size, params.resize_mode)
        lightness, ab = _ENCODE_LAB(img)  # == encode_lab(img)
        return Outcome("row", uri, sha, L=lightness, ab=ab, colorfulness=colorfulness_u8(img))
    except ImageReadError as err:
        return Outcome("quarantine", uri, sha, reason=_ingest_reason(err.reason))
    except Exception as err:  # one bad file never stops the run
        log.debug("unexpected error on %s", uri, exc_info=True)
        return Outcome("quarantine", uri, sha, reason=f"cannot decode ({type(err).__name__}: {err})")


def _process_batch(uris: list[str]) -> list[Outcome]:
    params, known = _STATE["params"], _STATE["known"]
    return [_process(uri, params, known) for uri in uris]


def prepare_batch(job: BatchJob) -> list[Outcome]:
    """Hash, dedup against ``job.known``, decode, resize and encode ``job.uris`` (the unit of work of a fan-out).

    Runs anywhere `ddcolor` is installed: a thread, a process, a Dask or Ray worker, with the storage settings of
    its own environment. On the first job of a run in another process it sets torch to one thread.

    Returns:
        One `Outcome` per URI, in ``job.uris`` order. A bad file is an Outcome (quarantine), never an exception.

    Raises:
        StorageError: an ``s3://`` input unreachable after retries (the run stops; a rerun completes it).
    """
    if job.origin != _origin() and _STATE.get("run_id") != job.run_id:
        _one_torch_thread()
        _STATE["run_id"] = job.run_id
    known = _load_hash_index(job.known_index) if job.known_index else frozenset()
    return [_process(uri, job.params, known) for uri in job.uris]


def _outcomes(inputs: list[str], params: PrepareParams, known: frozenset[str], workers: int) -> Iterator[Outcome]:
    """Outcomes in input order, from ``workers`` processes (0: this process), with a bounded queue."""
    if workers <= 0 or len(inputs) <= 1:
        for uri in inputs:
            yield _process(uri, params, known)
        return
    batches = [inputs[i : i + TASK_BATCH] for i in range(0, len(inputs), TASK_BATCH)]
    workers = min(workers, len(batches))
    ctx = multiprocessing.get_context("forkserver")  # no fork of a process that holds threads (torch, boto3)
    ctx.set_forkserver_preload([__name__])
    executor = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(params, known, _storage_env())
    )
    pending: deque[Future[list[Outcome]]] = deque()
    todo = iter(batches)
    try:
        for batch in todo:
            pending.append(executor.submit(_process_batch, batch))
            if len(pending) >= 4 * workers:
                break
        while pending:
            results = pending.popleft().result()
            batch = next(todo, None)
            if batch is not None:
                pending.append(executor.submit(_process_batch, batch))
            yield from results
    except BrokenProcessPool as err:
        raise IngestError(f"a worker process died ({err}); out of memory? Lower data.num_workers and rerun") from err
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _mapped_outcomes(
    inputs: list[str],
    params: PrepareParams,
    known: frozenset[str],
    map_batches: BatchMapper,
    batch_size: int,
    dest: str,
) -> Iterator[Outcome]:
    """Outcomes in input order from ``map_batches``; each batch's results are checked against its inputs."""
    if not inputs:
        return  # no executor started for nothing
    run_id, origin = uuid.uuid4().hex, _origin()
    index = write_hash_index(dest, known) if known else None
    jobs = [
        BatchJob(tuple(inputs[i : i + batch_size]), params, index, run_id, origin)
        for i in range(0, len(inputs), batch_size)
    ]
    results = map_batches(prepare_batch, jobs)
    done = 0
    try:
        for outcomes in results:
            if done == len(jobs):
                raise IngestError(f"map_batches returned more than the {len(jobs)} batches it was given")
            if not isinstance(outcomes, list | tuple) or not all(isinstance(o, Outcome) for o in outcomes):
                raise IngestError(
                    f"map_batches returned, as batch {done}, a {type(outcomes).__name__} that is not a list of "
                    "Outcome: a mapper must return one list per batch (what prepare_batch returned), in batch order"
                )
            got = [o.uri for o in outcomes]
            if got != list(jobs[done].uris):
                raise IngestError(
                    f"map_batches returned, as batch {done} of {len(jobs)}, the outcomes of {got[:2]}... instead of "
                    f"{list(jobs[done].uris[:2])}...: a mapper must return one list per batch, in batch order"
                )
            done += 1
            yield from outcomes
        if done != len(jobs):
            raise IngestError(f"map_batches returned {done} results for {len(jobs)} batches")
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()  # a generator mapper stops its executor now


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
    try:
        data = storage.read_json(storage.join(dest, QUARANTINE_NAME))
    except storage.StorageNotFoundError:
        return []
    if not isinstance(data, dict) or data.get("format") != QUARANTINE_FORMAT:
        raise IngestError(f"{storage.join(dest, QUARANTINE_NAME)}: not a {QUARANTINE_FORMAT} file")
    return list(data.get("entries", []))


def _known_hashes(dest: str, manifest: dict[str, Any] | None) -> frozenset[str]:
    import pyarrow.parquet as pq

    hashes: set[str] = set()
    for uri in shard_uris(dest, manifest) if manifest else []:
        try:
            with storage.open_input_file(uri) as fh:
                hashes.update(pq.read_table(fh, columns=["sha256"]).column("sha256").to_pylist())
        except storage.StorageNotFoundError:
            raise IngestError(f"{uri}: listed in the manifest but missing; the dataset at {dest} is damaged") from None
        except (OSError, ValueError, KeyError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError OSError
            raise IngestError(
                f"{uri}: unreadable shard ({type(err).__name__}: {err}); the dataset at {dest} is damaged: restore it "
                "(`dvc checkout data/shards`, `dvc pull`) or ingest into a new destination"
            ) from None
    return frozenset(hashes)


def _check_compatible(manifest: dict[str, Any] | None, cfg: DataConfig, dest: str) -> None:
    if manifest is None:
        return
    have = manifest.get("config", {})
    diff = [
        f"data.{k}={getattr(cfg, k)!r} (dataset: {have.get(k)!r})"
        for k in _CONFIG_KEYS
        if have.get(k) != getattr(cfg, k)
    ]
    if diff:
        raise IngestError(
            f"{dest} was built with other settings: {', '.join(diff)}. Use a new --dest, or the dataset's settings."
        )


class _ShardWriter:
    """Streams rows into Parquet shards of ``shard_rows`` rows (row groups of ROW_GROUP_ROWS) and uploads each."""

    def __init__(
        self, dest: str, first_index: int, shard_rows: int, size: int, tmpdir: Path, ingested_at: datetime
    ) -> None:
        self.dest, self.index, self.shard_rows, self.size, self.tmpdir = dest, first_index, shard_rows, size, tmpdir
        self.ingested_at = ingested_at
        self.entries: list[dict[str, Any]] = []
        self._writer: Any = None
        self._buffer: list[tuple[Outcome, str, bool]] = []
        self._rows = 0
        self._splits = {"train": 0, "val": 0}
        self._low = 0

    def add(self, outcome: Outcome, split: str, low: bool) -> None:
        self._buffer.append((outcome, split, low))
        self._rows += 1
        self._splits[split] += 1
        self._low += int(low)
        if len(self._buffer) >= ROW_GROUP_ROWS:
            self._write_group()
        if self._rows >= self.shard_rows:
            self._finish()

    def close(self) -> None:
        if self._rows:
            self._finish()

    def _write_group(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buffer:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self.tmpdir / "shard.parquet",
                SHARD_SCHEMA,
                compression="zstd",
                use_dictionary=["split"],
                write_statistics=["sha256", "split", "height", "width", "colorfulness", "low_colorfulness"],
            )
        size, n = self.size, len(self._buffer)
        table = pa.Table.from_pydict(
            {
                "sha256": [o.sha256 for o, _, _ in self._buffer],
                "source_uri": [o.uri for o, _, _ in self._buffer],
                "split": [s for _, s, _ in self._buffer],
                "height": [size] * n,
                "width": [size] * n,
                "L": [o.L for o, _, _ in self._buffer],
                "ab": [o.ab for o, _, _ in self._buffer],
                "colorfulness": [o.colorfulness for o, _, _ in self._buffer],
                "low_colorfulness": [low for _, _, low in self._buffer],
                "ingested_at": [self.ingested_at] * n,
            },
            schema=SHARD_SCHEMA,
        )
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self._buffer.clear()

    def _finish(self) -> None:
        self._write_group()
        self._writer.close()
        self._writer = None
        path = self.tmpdir / "shard.parquet"
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        sha = digest.hexdigest()
        rel = f"{SHARDS_DIR}/part-{self.index:05d}-{sha[:8]}.parquet"
        storage.upload_file(path, storage.join(self.dest, rel))
        self.entries.append(
            {
                "path": rel,
                "rows": self._rows,
                "bytes": path.stat().st_size,
                "sha256": sha,
                "splits": dict(self._splits),
                "low_colorfulness": self._low,
            }
        )
        log.info("wrote %s (%d rows)", storage.join(self.dest, rel), self._rows)
        path.unlink()
        self.index += 1
        self._rows, self._splits, self._low = 0, {"train": 0, "val": 0}, 0


def _manifest(cfg: DataConfig, shards: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {
        "rows": sum(s["rows"] for s in shards),
        "train": sum(s["splits"]["train"] for s in shards),
        "val": sum(s["splits"]["val"] for s in shards),
        "low_colorfulness": sum(s["low_colorfulness"] for s in shards),
        "shards": len(shards),
    }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {k: getattr(cfg, k) for k in _CONFIG_KEYS},
        "shards": shards,
        "counts": counts,
    }


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


def _name(obj: object) -> str:
    return getattr(obj, "__qualname__", None) or repr(obj)


def _list_inputs(source: str) -> tuple[list[str], int]:
    # paths as given (not resolved): shards must not record where the repository was checked out
    root = source if storage.is_s3(source) else str(Path(source))
    files = storage.list_files(root)
    prefix = root.rstrip("/") + "/"
    inputs = []
    for uri in files:
        rel = uri[len(prefix) :] if uri.startswith(prefix) else Path(uri).name
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if Path(rel).suffix.lower() in IMAGE_EXTENSIONS:
            inputs.append(uri)
    return inputs, len(files) - len(inputs)


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
        num_workers: worker processes for decode/resize/encode; 0 = this process. Default: ``data.num_workers``
            when the config sets it explicitly, else all available cores.
        progress: show a tqdm progress bar.
        map_batches: run the per-file work on this executor instead of the local process pool (then
            ``num_workers`` is not used): called once as ``map_batches(prepare_batch, jobs)`` with a list of
            `BatchJob`, it returns one ``list[Outcome]`` per job, in job order (see `BatchMapper`). The dataset is
            the same as with the local pool.
        batch_size: files per `BatchJob` for ``map_batches``; default `MAP_BATCH`.

    Returns:
        The `IngestReport` (quarantined files included; they are also in DEST's quarantine.json).

    Raises:
        IngestError: DEST holds a dataset built with another size/resize_mode/val_fraction/min_colorfulness, or is
            damaged; a worker process died; ``map_batches`` returned results out of order or a wrong number of them.
        ValueError: ``batch_size`` < 1.
        StorageError: SOURCE or DEST unreachable (after retries), missing, or access denied. Nothing is committed
            then (no manifest change); shards already uploaded are ignored, and a rerun completes the dataset.
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
    ingested_at = datetime.now(UTC)

    manifest = load_manifest(dest)
    _check_compatible(manifest, cfg, dest)
    known = _known_hashes(dest, manifest)
    orphans = orphan_shards(dest, manifest)
    if orphans:
        log.warning(
            "%d shard files under %s are not in the manifest (left by an interrupted run) and are ignored; "
            "they can be deleted",
            len(orphans),
            storage.join(dest, SHARDS_DIR),
        )
    inputs, skipped = _list_inputs(source)
    old_shards = list((manifest or {}).get("shards", []))
    log.info(
        "ingest %s -> %s: %d image files (%d other files skipped); dataset has %d rows in %d shards; %s",
        source,
        dest,
        len(inputs),
        skipped,
        len(known),
        len(old_shards),
        f"{workers} workers" if map_batches is None else f"batches mapped by {_name(map_batches)}",
    )

    if not inputs:
        log.warning("no image files under %s (extensions: %s)", source, ", ".join(sorted(IMAGE_EXTENSIONS)))
    report = IngestReport(dataset_uri=dest, inputs=len(inputs), skipped=skipped)
    params = PrepareParams(cfg.size, cfg.resize_mode, cfg.max_image_pixels)
    seen: set[str] = set(known)
    new_hashes: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="ddcolor-ingest-") as tmp:
        writer = _ShardWriter(dest, len(old_shards), cfg.shard_rows, cfg.size, Path(tmp), ingested_at)
        bar = tqdm(total=len(inputs), unit="img", desc="ingest", disable=not progress, dynamic_ncols=True)
        if map_batches is None:
            outcomes = _outcomes(inputs, params, known, workers)
        else:
            outcomes = _mapped_outcomes(inputs, params, known, map_batches, batch_size or MAP_BATCH, dest)
        # closing(): on a failure the worker pool stops now, not when the traceback is collected
        with bar, contextlib.closing(outcomes), logging_redirect_tqdm() if progress else contextlib.nullcontext():
            for outcome in outcomes:
                bar.update(1)
                if outcome.kind == "duplicate" or (outcome.kind == "row" and outcome.sha256 in seen):
                    report.duplicates += 1
                    log.debug("duplicate: %s (%s)", outcome.uri, outcome.sha256)
                elif outcome.kind == "quarantine":
                    report.quarantined.append(QuarantineEntry(outcome.uri, outcome.sha256, outcome.reason))
                    log.warning("quarantined %s: %s", outcome.uri, outcome.reason)
                else:
                    seen.add(outcome.sha256)
                    new_hashes.add(outcome.sha256)
                    writer.add(
                        outcome,
                        split_for(outcome.sha256, cfg.val_fraction),
                        outcome.colorfulness < cfg.min_colorfulness,
                    )
                    report.ingested += 1
            writer.close()

    # commit: quarantine first, manifest last (atomic), so a reader never sees a half-written dataset
    _update_quarantine(dest, report.quarantined, new_hashes, ingested_at)
    shards = old_shards + writer.entries
    if writer.entries or manifest is None:
        storage.write_json(storage.join(dest, MANIFEST_NAME), _manifest(cfg, shards))
    report.new_shards = [e["path"] for e in writer.entries]
    report.total_rows = sum(s["rows"] for s in shards)
    report.seconds = time.monotonic() - started
    assert report.balanced, report
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


def _update_quarantine(dest: str, new: Sequence[QuarantineEntry], ingested: set[str], when: datetime) -> None:
    existing = load_quarantine(dest)
    entries = [e for e in existing if e.get("sha256") not in ingested]
    keys = {(e.get("source_uri"), e.get("sha256")) for e in entries}
    for q in new:
        if (q.source_uri, q.sha256) not in keys:
            keys.add((q.source_uri, q.sha256))
            entries.append(
                {
                    "source_uri": q.source_uri,
                    "sha256": q.sha256,
                    "reason": q.reason,
                    "quarantined_at": when.isoformat(timespec="seconds"),
                }
            )
    if entries != existing or (not existing and not storage.exists(storage.join(dest, QUARANTINE_NAME))):
        storage.write_json(
            storage.join(dest, QUARANTINE_NAME),
            {"format": QUARANTINE_FORMAT, "format_version": FORMAT_VERSION, "entries": entries},
        )
