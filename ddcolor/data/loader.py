"""Streaming Lab Parquet shards into training: `LabShardDataset`, `collate`, `build_dataloader`.

A dataset is a folder or ``s3://`` prefix with ``manifest.json`` and the shards it lists (format:
`ddcolor.data.manifest`; rows: `ddcolor.data.shards`); only listed shards are read. On construction the dataset
reads each shard's footer and its small columns (``sha256``, ``split``, ``height``, ``width``, ``colorfulness``,
``low_colorfulness``) to build a row index, and checks the schema and row count: a shard that cannot be read, has the
wrong schema or another row count than the manifest says raises `ShardError` naming it (so does a corrupt row when
it is read). Pixels are read later, one Parquet row group at a time (local files memory-mapped; S3 objects through
`ddcolor.storage.open_input_file`, ranged GETs with retries, so only the footer and the needed column chunks
travel). Nothing is cached on disk.

The epoch plan (a pure function of ``seed``, ``epoch``, ``rank``, ``world_size`` and the batch layout, computed
the same way in every process, so there is no communication):

1. Blocks: a block is one Parquet row group, holding the rows of the split that pass the colorfulness filter.
   Training shuffles the block order and the rows inside each block (``numpy`` ``default_rng([seed, epoch])``);
   validation keeps manifest order.
2. Ranks: the concatenated row sequence is cut into ``world_size`` contiguous, equal parts (contiguous so that
   each rank reads about ``1/world_size`` of the bytes). With ``drop_remainder`` (default for training) every
   rank gets ``N // world_size`` rows and the last ``N % world_size`` rows of the sequence are dropped for this
   epoch; with ``drop_last`` (set by `build_dataloader` for training) each rank also drops its rows past the last
   full batch. Which rows are dropped changes every epoch (the order does) and `plan` reports them by sha256.
   Equal counts per rank keep DDP ranks in step. Without ``drop_remainder`` (default for validation) the parts
   differ by at most one row and every row is seen exactly once; with ``world_size == 1`` nothing is dropped
   unless ``drop_last``.
3. Workers: a rank's rows are cut into ``K`` contiguous segments, one per DataLoader worker, each shuffled by
   an index-level shuffle buffer (``shuffle_buffer`` rows) and read by that worker only (I/O locality). The
   rank's sample order ``R`` interleaves the segments batch by batch exactly as `torch.utils.data.DataLoader`
   collects batches from its workers (round robin, in order), so the loader yields ``R`` verbatim.
4. Augmentation (training): a random ``crop_size`` crop and a horizontal flip with probability 1/2, drawn from
   ``default_rng([seed, epoch, row])``, so a resumed epoch reproduces the same crops.

Resume: ``state_dict()`` records the epoch and the position (samples of ``R`` already consumed at this rank) plus
the batch layout ``R`` was built with; after ``load_state_dict`` the rank yields exactly ``R[position:]``, even
with a different number of workers or batch size (then the remainder of that epoch reads with less locality).
With workers, only `LabDataLoader` (returned by `build_dataloader`) knows how many samples the trainer took;
the dataset's own ``state_dict`` counts samples yielded in its own process (``num_workers=0``).

Batches: the dataset knows the DataLoader's ``batch_size`` and writes each batch's samples into one
(B, C, H, W) buffer per tensor (in shared memory inside a worker); the samples are views of it, and `collate`
hands the buffer on instead of copying (any other list of samples is stacked). ``gray_rgb`` comes from a
256-entry table of `ddcolor.color.gray_rgb_from_l` (exact: the function is per pixel and stored L is uint8).

Memory per worker: the Parquet row groups being read plus at most about ``shuffle_buffer + rows per row group``
undecoded rows (``3 * H * W`` bytes each: 196 KB at 256 px).

Use with a trainer::

    loader = build_dataloader(cfg.data, uri, "train", batch_size=16, rank=rank, world_size=world, epoch=0)
    loader.load_state_dict(checkpoint["loader"])        # on resume (same rank / world size / seed)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)                          # keeps a resume position of the same epoch
        for batch in loader:                             # gray_rgb (B,3,H,W), l (B,1,H,W), ab (B,2,H,W), sha256
            ...
            checkpoint["loader"] = loader.state_dict()   # {"epoch", "position", ...}: JSON-serialisable
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from ddcolor import storage
from ddcolor.color import gray_rgb_from_l
from ddcolor.data.manifest import MANIFEST_NAME, ManifestError, read_manifest, schema_problems
from ddcolor.data.shards import L_SCALE, SPLITS
from ddcolor.errors import DDColorError

__all__ = [
    "MANIFEST_NAME",
    "EpochPlan",
    "LabDataLoader",
    "LabShardDataset",
    "ShardError",
    "build_dataloader",
    "collate",
]

log = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER = 512
STATE_VERSION = 1

_INDEX_COLUMNS = ["sha256", "split", "height", "width", "colorfulness", "low_colorfulness"]
_READ_COLUMNS = ["sha256", "height", "width", "L", "ab"]
_OPEN_FILES = 8  # Parquet files kept open per process
_INDEX_THREADS = 8  # shards indexed in parallel (I/O bound)


class ShardError(DDColorError, ValueError):
    """A shard (or the manifest) that cannot be used: unreadable, wrong schema, or a corrupt row.

    The message starts with the shard's URI; ``shard`` holds it too (None after crossing a DataLoader worker).
    """

    def __init__(self, message: str, shard: str | None = None) -> None:
        super().__init__(message)
        self.shard = shard


# --- I/O -----------------------------------------------------------------------------------------------------


def _local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def _open_parquet(uri: str) -> pq.ParquetFile:
    """Open one shard for reading (memory map locally, ranged reads on S3); `ShardError` naming it on failure."""
    try:
        source: Any = storage.open_input_file(uri) if storage.is_s3(uri) else pa.memory_map(_local_path(uri), "r")
        return pq.ParquetFile(source)
    except Exception as err:
        raise ShardError(f"{uri}: cannot open Parquet shard: {type(err).__name__}: {err}", uri) from err


def _read_manifest(uri: str) -> dict[str, Any]:
    """`ddcolor.data.manifest.read_manifest`, failing as the loader does: a `ShardError` naming the manifest."""
    try:
        return read_manifest(uri)
    except ManifestError as err:
        raise ShardError(str(err), err.uri) from err
    except storage.StorageError as err:
        path = storage.join(uri, MANIFEST_NAME)
        raise ShardError(f"{path}: cannot read dataset manifest: {type(err).__name__}: {err}", path) from err


# --- index ---------------------------------------------------------------------------------------------------


def _check_schema(uri: str, schema: pa.Schema) -> None:
    problems = schema_problems(schema, allow_extra_columns=True)  # only the known columns are read
    if problems:
        raise ShardError(f"{uri}: wrong shard schema: {'; '.join(problems)}", uri)


@dataclass
class _ShardIndex:
    uri: str
    row_groups: list[int]  # rows per row group
    sha256: np.ndarray  # (rows,) S64
    split: np.ndarray  # (rows,) object str
    size: np.ndarray  # (rows, 2) int32 height, width
    colorfulness: np.ndarray  # (rows,) float32
    low_colorfulness: np.ndarray  # (rows,) bool


def _index_shard(uri: str, expected_rows: int | None) -> _ShardIndex:
    pf = _open_parquet(uri)
    try:
        _check_schema(uri, pf.schema_arrow)
        meta = pf.metadata
        if expected_rows is not None and meta.num_rows != expected_rows:
            raise ShardError(f"{uri}: has {meta.num_rows} rows, the manifest lists {expected_rows}", uri)
        table = pf.read(columns=_INDEX_COLUMNS)
    except ShardError:
        raise
    except Exception as err:
        raise ShardError(f"{uri}: cannot read index columns: {type(err).__name__}: {err}", uri) from err
    finally:
        pf.close(force=True)
    return _ShardIndex(
        uri=uri,
        row_groups=[meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
        sha256=np.asarray(table.column("sha256").to_pylist(), dtype="S64"),
        split=np.asarray(table.column("split").to_pylist(), dtype=object),
        size=np.stack([table.column(c).to_numpy().astype(np.int32) for c in ("height", "width")], axis=1),
        colorfulness=table.column("colorfulness").to_numpy().astype(np.float32),
        low_colorfulness=table.column("low_colorfulness").to_numpy().astype(bool),
    )


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch covers, the same for every rank and worker.

    Attributes:
        epoch: the epoch.
        rows: rows of the split that pass the colorfulness filter (the epoch's universe).
        rows_per_rank: rows each rank yields in this epoch (before any resume position).
        dropped: sha256 of the rows no rank yields in this epoch (empty without ``drop_remainder`` /
            ``drop_last``).
    """

    epoch: int
    rows: int
    rows_per_rank: tuple[int, ...]
    dropped: tuple[str, ...]


def _buffer_shuffle(seq: np.ndarray, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order a streaming shuffle buffer of ``buffer`` items emits ``seq`` in (on indices, no data)."""
    n = len(seq)
    if buffer <= 1 or n <= 1:
        return seq.copy()
    if buffer >= n:
        return rng.permutation(seq)
    picks = rng.integers(0, buffer, size=n - buffer).tolist()
    items = seq.tolist()
    buf = items[:buffer]
    out = []
    append = out.append
    for t, item in enumerate(items[buffer:]):
        j = picks[t]
        append(buf[j])
        buf[j] = item
    rng.shuffle(buf)
    out.extend(buf)
    return np.asarray(out, dtype=seq.dtype)


def _chunk_sizes(n: int, batch: int) -> list[int]:
    full, rest = divmod(n, batch)
    return [batch] * full + ([rest] if rest else [])


# --- Lab tables: gray RGB and L from the stored uint8 L ------------------------------------------------------

_GRAY_TABLE: tuple[torch.Tensor, ...] | None = None


def _gray_table() -> tuple[torch.Tensor, ...]:
    """Per channel, (256,) float32: gray_rgb_from_l of every stored L value (it is per pixel: a lookup is exact)."""
    global _GRAY_TABLE
    if _GRAY_TABLE is None:
        l_values = torch.arange(256, dtype=torch.float32).numpy() / L_SCALE  # as decode_lab computes L
        rgb = gray_rgb_from_l(torch.from_numpy(l_values).view(1, 1, 1, 256))[0, :, 0, :]
        _GRAY_TABLE = tuple(rgb[c].clone() for c in range(3))
    return _GRAY_TABLE


def _gray_rgb(lightness: np.ndarray, out: torch.Tensor) -> None:
    """Write gray_rgb_from_l of stored uint8 L (H, W) into ``out`` (3, H, W) float32, by table lookup."""
    index = torch.from_numpy(lightness).view(-1).long()
    flat = out.view(3, -1)
    for c, table in enumerate(_gray_table()):
        torch.index_select(table, 0, index, out=flat[c])


def _empty(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """An uninitialised float32 tensor; in shared memory if ``shared`` (as default_collate does in workers)."""
    if not shared:
        return torch.empty(shape)
    elem = torch.empty(0)
    shared_storage = elem._typed_storage()._new_shared(int(np.prod(shape)), device=elem.device)
    return elem.new(shared_storage).view(shape)


def _binary_views(column: pa.ChunkedArray) -> list[np.ndarray]:
    """The values of a binary column as zero-copy uint8 numpy views (they keep the Arrow buffer alive)."""
    views = []
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        offs = np.frombuffer(offsets, dtype=np.int32, count=len(chunk) + 1, offset=chunk.offset * 4)
        values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        views.extend(values[a:b] for a, b in zip(offs[:-1].tolist(), offs[1:].tolist(), strict=True))
    return views


# --- the dataset ---------------------------------------------------------------------------------------------


class LabShardDataset(IterableDataset):
    """Stream (gray RGB, L, ab) samples from a Lab shard dataset, sharded over DDP ranks and DataLoader workers.

    Each sample is a dict: ``gray_rgb`` (3, H, W) float32 in [0, 1] (`ddcolor.color.gray_rgb_from_l` of L),
    ``l`` (1, H, W) float32 in [0, 100], ``ab`` (2, H, W) float32 in Lab units, ``sha256`` str. See the module
    docstring for the epoch plan, remainder handling and resume.

    Args:
        uri: dataset folder or ``s3://`` prefix holding ``manifest.json``.
        split: ``"train"`` or ``"val"``.
        crop_size: square crop side, px; None keeps the stored size. Training crops at random, validation
            in the center. Larger than a stored image is an error.
        hflip: random horizontal flip (training only).
        exclude_low_colorfulness: leave out rows flagged as low colorfulness.
        min_colorfulness: if given, "low colorfulness" means ``colorfulness < min_colorfulness`` (re-thresholding
            the stored metric); None uses the ``low_colorfulness`` flag set at ingestion.
        shuffle_buffer: rows in each worker's shuffle buffer (training); 0 or 1 shuffles blocks only.
        seed: seed of the shuffles and augmentations (the same on every rank).
        rank, world_size: DDP position; None takes them from ``torch.distributed`` if initialized, else 0 / 1.
        shuffle: None = ``split == "train"``. Also turns augmentation on / off.
        drop_remainder: give every rank ``N // world_size`` rows and drop the rest this epoch;
            None = ``split == "train"``.
        batch_size: the DataLoader batch size, so the order interleaves workers as the DataLoader does (only the
            order and locality depend on it; coverage does not). 1 when iterating the dataset directly.
        drop_last: also drop each rank's rows past its last full ``batch_size`` batch.

    Raises:
        ShardError: a missing / bad manifest, or a listed shard that cannot be read, has the wrong schema or a
            row count different from the manifest's (the message names the shard).
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        split: str = "train",
        crop_size: int | None = None,
        hflip: bool = True,
        exclude_low_colorfulness: bool = True,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        *,
        min_colorfulness: float | None = None,
        shuffle: bool | None = None,
        drop_remainder: bool | None = None,
        batch_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size must be positive or None, got {crop_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size is None or rank is None:
            dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
            world_size = (
                world_size if world_size is not None else (torch.distributed.get_world_size() if dist_on else 1)
            )
            rank = rank if rank is not None else (torch.distributed.get_rank() if dist_on else 0)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.uri = str(uri)
        self.split = split
        self.crop_size = crop_size
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.hflip = hflip
        self.exclude_low_colorfulness = exclude_low_colorfulness
        self.min_colorfulness = min_colorfulness
        self.shuffle_buffer = max(0, int(shuffle_buffer))
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_remainder = split == "train" if drop_remainder is None else drop_remainder
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.epoch = 0
        self._start = 0  # resume position within self.epoch
        self._resume_layout: tuple[int, int] | None = None  # (num_workers, batch_size) R was built with
        self._position = 0  # samples yielded in this process in self.epoch (including the start)
        self._sequence: tuple[int, np.ndarray] | None = None
        self._orders: dict[tuple[int, int, int], np.ndarray] = {}
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._build_index()

    # -- index -----------------------------------------------------------------------------------------------

    def _build_index(self) -> None:
        self.manifest = _read_manifest(self.uri)
        entries = self.manifest["shards"]
        uris = [storage.join(self.uri, e["path"]) for e in entries]
        rows = [e.get("rows") for e in entries]
        with ThreadPoolExecutor(max_workers=min(_INDEX_THREADS, max(1, len(uris)))) as pool:
            shards = list(pool.map(_index_shard, uris, rows))
        self.shard_uris = uris
        shard_ids, rg_ids, rows_in_rg, shas, sizes, block_ids = [], [], [], [], [], []
        block_count = 0
        for s, info in enumerate(shards):
            low = info.low_colorfulness
            if self.min_colorfulness is not None:
                low = info.colorfulness < self.min_colorfulness
            keep = info.split == self.split
            if self.exclude_low_colorfulness:
                keep &= ~low
            starts = np.cumsum([0, *info.row_groups])
            for g, count in enumerate(info.row_groups):
                local = np.flatnonzero(keep[starts[g] : starts[g] + count])
                shard_ids.append(np.full(len(local), s, dtype=np.int32))
                rg_ids.append(np.full(len(local), g, dtype=np.int32))
                rows_in_rg.append(local.astype(np.int32))
                shas.append(info.sha256[starts[g] + local])
                sizes.append(info.size[starts[g] + local])
                block_ids.append(np.full(len(local), block_count, dtype=np.int64))
                block_count += 1
        cat = np.concatenate
        self._shard = cat(shard_ids) if shard_ids else np.zeros(0, np.int32)
        self._rg = cat(rg_ids) if rg_ids else np.zeros(0, np.int32)
        self._row = cat(rows_in_rg) if rows_in_rg else np.zeros(0, np.int32)
        self._sha = cat(shas) if shas else np.zeros(0, "S64")
        self._size = cat(sizes) if sizes else np.zeros((0, 2), np.int32)
        self._block = cat(block_ids) if block_ids else np.zeros(0, np.int64)
        # rows are grouped by block in index order: block b holds rows _block_start[b]:_block_start[b + 1]
        self._block_start = np.searchsorted(self._block, np.arange(block_count + 1))
        self.num_rows = len(self._sha)

    # -- plan ------------------------------------------------------------------------------------------------

    def _global_sequence(self, epoch: int) -> np.ndarray:
        """All eligible rows (index ids) in this epoch's block order."""
        if self._sequence is not None and self._sequence[0] == epoch:
            return self._sequence[1]
        ids = np.arange(self.num_rows, dtype=np.int64)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            blocks = rng.permutation(len(self._block_start) - 1)
            parts = [rng.permutation(ids[self._block_start[b] : self._block_start[b + 1]]) for b in blocks]
            ids = np.concatenate(parts) if parts else ids
        self._sequence = (epoch, ids)
        return ids

    def _rank_slices(self, n: int) -> list[tuple[int, int]]:
        w = self.world_size
        if self.drop_remainder:
            per = n // w
            bounds = [(r * per, (r + 1) * per) for r in range(w)]
        else:
            per, extra = divmod(n, w)
            bounds, start = [], 0
            for r in range(w):
                size = per + (r < extra)
                bounds.append((start, start + size))
                start += size
        if self.drop_last:
            bounds = [(a, a + (b - a) // self.batch_size * self.batch_size) for a, b in bounds]
        return bounds

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The epoch's coverage: rows per rank and the rows dropped (by sha256) to keep ranks even."""
        epoch = self.epoch if epoch is None else epoch
        seq = self._global_sequence(epoch)
        bounds = self._rank_slices(len(seq))
        kept = np.zeros(len(seq), dtype=bool)
        for a, b in bounds:
            kept[a:b] = True
        dropped = tuple(s.decode() for s in self._sha[seq[~kept]])
        return EpochPlan(epoch, len(seq), tuple(b - a for a, b in bounds), dropped)

    def _order(self, epoch: int, num_workers: int, batch_size: int) -> np.ndarray:
        """R: this rank's full sample order for the epoch as the DataLoader yields it (index ids)."""
        key = (epoch, num_workers, batch_size)
        if key in self._orders:
            return self._orders[key]
        seq = self._global_sequence(epoch)
        a, b = self._rank_slices(len(seq))[self.rank]
        mine = seq[a:b]
        if not self.shuffle:
            order = mine
        else:
            # position p of R comes from worker (p // batch_size) % num_workers, which reads a contiguous segment
            owner = (np.arange(len(mine)) // batch_size) % num_workers
            order, start = np.empty_like(mine), 0
            for w in range(num_workers):
                slots = np.flatnonzero(owner == w)
                rng = np.random.default_rng([self.seed, epoch, self.rank, w, num_workers, 1])
                order[slots] = _buffer_shuffle(mine[start : start + len(slots)], self.shuffle_buffer, rng)
                start += len(slots)
        self._orders = {key: order}  # keep one
        return order

    # -- epoch / resume --------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the order and augmentations). A resume position is kept only for its epoch."""
        if epoch != self.epoch:
            self._start, self._resume_layout = 0, None
        self.epoch = int(epoch)
        self._position = self._start

    def __len__(self) -> int:
        """Samples this rank yields in a full epoch (equal on all ranks with ``drop_remainder``)."""
        a, b = self._rank_slices(self.num_rows)[self.rank]
        return b - a

    def state_dict(self, position: int | None = None, num_workers: int = 0) -> dict[str, Any]:
        """Where this rank is in the epoch: samples consumed (``position``; default: those yielded in this process).

        Args:
            position: samples the trainer has consumed at this rank in the current epoch; pass it when iterating
                through DataLoader workers (or use `LabDataLoader.state_dict`, which does).
            num_workers: the DataLoader workers the epoch is being read with (0: in this process).
        """
        layout = self._resume_layout or (max(1, num_workers), self.batch_size)
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": int(self._position if position is None else position),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "split": self.split,
            "rows": self.num_rows,
            "num_workers": layout[0],
            "batch_size": layout[1],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: iterating ``state["epoch"]`` yields exactly the samples after ``state["position"]``.

        Args:
            state: from `state_dict` (or `LabDataLoader.state_dict`).

        Raises:
            ValueError: the state is for another dataset, split, seed, rank or world size.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')!r}")
        mine = {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "split": self.split}
        mine["rows"] = self.num_rows
        wrong = [f"{k}: state {state.get(k)!r} != {v!r}" for k, v in mine.items() if state.get(k) != v]
        if wrong:
            raise ValueError("loader state does not match this dataset: " + "; ".join(wrong))
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"loader state position {position} outside [0, {len(self)}]")
        self.epoch = int(state["epoch"])
        self._start = self._position = position
        self._resume_layout = (int(state["num_workers"]), int(state["batch_size"]))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()  # open files stay in their process
        state["_orders"] = {}
        return state

    # -- iteration -------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        layout = self._resume_layout or (num_workers, self.batch_size)
        order = self._order(self.epoch, *layout)
        start = self._start
        # this worker's samples: batch-sized chunks of R[start:], round robin over the workers
        sizes = _chunk_sizes(len(order) - start, self.batch_size)
        bounds = np.cumsum([start, *sizes])
        mine = [order[bounds[j] : bounds[j + 1]] for j in range(worker, len(sizes), num_workers)]
        if worker == 0 and self.rank == 0 and start == 0:
            dropped = self.num_rows - sum(b - a for a, b in self._rank_slices(self.num_rows))
            if dropped:
                log.info("epoch %d: %d of %d rows dropped to keep ranks even", self.epoch, dropped, self.num_rows)
        self._position = start
        for sample in self._read(mine, shared=info is not None):
            if info is None:
                self._position += 1
            yield sample

    def _parquet(self, shard: int) -> pq.ParquetFile:
        pf = self._files.get(shard)
        if pf is None:
            pf = _open_parquet(self.shard_uris[shard])
            self._files[shard] = pf
            while len(self._files) > _OPEN_FILES:
                self._files.popitem(last=False)[1].close(force=True)
        else:
            self._files.move_to_end(shard)
        return pf

    def _load_block(self, ids: np.ndarray) -> dict[int, tuple]:
        """Raw rows (sha, h, w, L bytes, ab bytes) for index ids that all lie in one row group."""
        shard, rg = int(self._shard[ids[0]]), int(self._rg[ids[0]])
        uri = self.shard_uris[shard]
        try:
            # one thread per DataLoader worker; Arrow's pool when reading in the main process
            threads = get_worker_info() is None
            table = self._parquet(shard).read_row_group(rg, columns=_READ_COLUMNS, use_threads=threads)
            table = table.take(pa.array(self._row[ids]))
            cols = [table.column(c).to_pylist() for c in _READ_COLUMNS[:3]]
            cols += [_binary_views(table.column(c)) for c in _READ_COLUMNS[3:]]
        except ShardError:
            raise
        except Exception as err:
            raise ShardError(f"{uri}: cannot read row group {rg}: {type(err).__name__}: {err}", uri) from err
        rows = {}
        for k, i in enumerate(ids.tolist()):
            sha = cols[0][k]
            if sha.encode() != self._sha[i]:
                raise ShardError(f"{uri}: row group {rg} changed since the dataset was indexed (sha256 {sha})", uri)
            rows[i] = (sha, cols[1][k], cols[2][k], cols[3][k], cols[4][k])
        return rows

    def _read(self, chunks: list[np.ndarray], shared: bool) -> Iterator[dict[str, Any]]:
        """Samples for ``chunks`` (batches of index ids), in order, reading each row group once.

        A batch whose samples share one output size is written into one (B, C, H, W) buffer per tensor (in shared
        memory inside a DataLoader worker) and its samples are views of it, so `collate` needs no copy.
        """
        ids = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
        need: dict[int, list[int]] = {}
        for i, b in zip(ids.tolist(), self._block[ids].tolist(), strict=True):
            need.setdefault(b, []).append(i)
        pending: dict[int, tuple] = {}
        for chunk in chunks:
            shapes = {self._out_shape(i) for i in chunk.tolist()}
            out = None
            if len(chunk) > 1 and len(shapes) == 1:
                h, w = shapes.pop()
                out = tuple(_empty((len(chunk), c, h, w), shared) for c in (3, 1, 2))
            for k, i in enumerate(chunk.tolist()):
                row = pending.pop(i, None)
                if row is None:
                    pending.update(self._load_block(np.asarray(need.pop(int(self._block[i])), dtype=np.int64)))
                    row = pending.pop(i)
                yield self._sample(i, row, None if out is None else tuple(t[k] for t in out))

    def _out_shape(self, index: int) -> tuple[int, int]:
        if self.crop_size is not None:
            return self.crop_size, self.crop_size
        h, w = self._size[index].tolist()
        return h, w

    def _sample(self, index: int, row: tuple, out: tuple[torch.Tensor, ...] | None = None) -> dict[str, Any]:
        sha, height, width, l_bytes, ab_bytes = row
        if len(l_bytes) != height * width or len(ab_bytes) != 2 * height * width:
            uri = self.shard_uris[int(self._shard[index])]
            raise ShardError(
                f"{uri}: corrupt row {sha}: {len(l_bytes)} L / {len(ab_bytes)} ab bytes, expected "
                f"{height * width} / {2 * height * width} for {height}x{width}",
                uri,
            )
        lightness = np.frombuffer(l_bytes, dtype=np.uint8).reshape(height, width)
        ab = np.frombuffer(ab_bytes, dtype=np.int8).reshape(2, height, width)  # views, no copy
        rng = np.random.default_rng([self.seed, self.epoch, index, 2]) if self.shuffle else None
        if self.crop_size is not None and (height, width) != (self.crop_size, self.crop_size):
            c = self.crop_size
            if c > height or c > width:
                uri = self.shard_uris[int(self._shard[index])]
                raise ValueError(f"{uri}: row {sha} is {height}x{width}, smaller than crop_size {c}")
            if rng is not None:
                top, left = int(rng.integers(0, height - c + 1)), int(rng.integers(0, width - c + 1))
            else:
                top, left = (height - c) // 2, (width - c) // 2
            lightness = lightness[top : top + c, left : left + c]
            ab = ab[:, top : top + c, left : left + c]
        if rng is not None and self.hflip and rng.random() < 0.5:
            lightness, ab = lightness[:, ::-1], ab[:, :, ::-1]
        lightness = np.ascontiguousarray(lightness)
        h, w = lightness.shape
        gray, lab_l, lab_ab = out if out is not None else (torch.empty(c, h, w) for c in (3, 1, 2))
        _gray_rgb(lightness, gray)
        np.divide(lightness, np.float32(L_SCALE), out=lab_l.numpy()[0], dtype=np.float32)  # = decode_lab's L
        lab_ab.numpy()[...] = ab
        return {"gray_rgb": gray, "l": lab_l, "ab": lab_ab, "sha256": sha}


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack; if the tensors are consecutive rows of one buffer (as `LabShardDataset` makes them), return it."""
    first = tensors[0]
    ptr, offset, shape, numel = first.untyped_storage().data_ptr(), first.storage_offset(), first.shape, first.numel()
    if all(
        t.is_contiguous()
        and t.shape == shape
        and t.untyped_storage().data_ptr() == ptr
        and t.storage_offset() == offset + k * numel
        for k, t in enumerate(tensors)
    ):
        return first.new_empty(0).set_(first.untyped_storage(), offset, (len(tensors), *shape))
    return default_collate(tensors)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch: ``gray_rgb`` (B, 3, H, W), ``l`` (B, 1, H, W), ``ab`` (B, 2, H, W), ``sha256``.

    Samples that `LabShardDataset` wrote into one batch buffer are returned as that buffer (no copy).
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, Any] = {key: _stack([s[key] for s in samples]) for key in ("gray_rgb", "l", "ab")}
    batch["sha256"] = [s["sha256"] for s in samples]
    return batch


# --- the loader ----------------------------------------------------------------------------------------------


class LabDataLoader(DataLoader):
    """A `DataLoader` over a `LabShardDataset` that counts the samples handed to the trainer, for resume.

    ``set_epoch`` selects the epoch; ``state_dict()`` after consuming k samples of an epoch and
    ``load_state_dict()`` on a new loader make its next iteration yield exactly the samples after those k.
    """

    dataset: LabShardDataset

    def __init__(self, dataset: LabShardDataset, **kwargs: Any) -> None:
        kwargs.setdefault("collate_fn", collate)
        if kwargs.setdefault("batch_size", dataset.batch_size) != dataset.batch_size:
            raise ValueError(f"batch_size {kwargs['batch_size']} != the dataset's batch_size {dataset.batch_size}")
        kwargs["persistent_workers"] = False  # workers must see set_epoch / load_state_dict
        super().__init__(dataset, **kwargs)
        self._consumed = dataset._start

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self._consumed = self.dataset._start

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        self._consumed = self.dataset._start
        for batch in super().__iter__():
            self._consumed += len(batch["sha256"])
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The dataset state with ``position`` = samples of this epoch handed to the trainer so far."""
        return self.dataset.state_dict(position=self._consumed, num_workers=self.num_workers)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._consumed = self.dataset._start


def build_dataloader(
    data_config: Any,
    uri: str | os.PathLike[str],
    split: str,
    batch_size: int,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int | None = None,
    epoch: int = 0,
    *,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    pin_memory: bool = False,
) -> LabDataLoader:
    """The trainer's loader: a `LabDataLoader` over a `LabShardDataset` configured from ``data_config``.

    Training: shuffled, augmented (random ``data.size`` crop if the shards are larger, ``data.hflip``), rows with
    ``colorfulness < data.min_colorfulness`` left out, equal rows per rank and full batches only (the rows this
    drops are in ``loader.dataset.plan().dropped``). Validation: manifest order, no augmentation (center crop if
    the shards are larger), every row exactly once over the ranks.

    Args:
        data_config: a `ddcolor.config.DataConfig` (uses ``size``, ``hflip``, ``min_colorfulness``, ``seed``,
            ``num_workers``).
        uri: dataset folder or ``s3://`` prefix.
        split: ``"train"`` or ``"val"``.
        batch_size: per-rank batch size.
        rank, world_size: DDP position (None: from ``torch.distributed`` if initialized).
        num_workers: DataLoader workers (None: ``data_config.num_workers``).
        epoch: the first epoch (``loader.set_epoch`` selects later ones).
    """
    train = split == "train"
    dataset = LabShardDataset(
        uri,
        split=split,
        crop_size=data_config.size,
        hflip=data_config.hflip,
        exclude_low_colorfulness=train,
        min_colorfulness=data_config.min_colorfulness,
        shuffle_buffer=shuffle_buffer,
        seed=data_config.seed,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        drop_last=train,
    )
    dataset.set_epoch(epoch)
    workers = data_config.num_workers if num_workers is None else num_workers
    return LabDataLoader(dataset, num_workers=workers, pin_memory=pin_memory)
