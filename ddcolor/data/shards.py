"""The Lab Parquet shard format: one row per image, written by ingestion (`write_shard_file`), read by validation
and the loader.

Storage choice (per pixel: 1 byte L + 2 bytes ab = 3 bytes, the same as the 8-bit sRGB source):
- `L` is uint8, L* scaled by 255/100 and rounded: step 0.39 L* units (max error 0.2), finer than the
  ~0.4 L* step of the 8-bit sRGB source itself.
- `ab` is int8, a*/b* rounded to whole Lab units and clamped to [-128, 127]: max error 0.5, below the
  ~1 unit step that 8-bit sRGB quantisation already causes in ab.
float16 would double the bytes (6 per pixel) to keep precision the source never had.

Both are planar, row-major: `L` holds H*W bytes, `ab` holds 2*H*W bytes (all of a, then all of b).

Same bytes on every CPU: the Lab values are computed in float64 before rounding. Over all 2^24 8-bit sRGB
colors, no value to be rounded lies closer than 5e-9 to a rounding boundary (x.5), while float64 differs
between SIMD code paths (AVX2, AVX-512, AMX machines) by about 1e-13; so every machine rounds the same way
(tests/test_shards.py checks the margin over all colors). In float32 the error (~1e-5) crossed a boundary:
shards ingested on an AVX2 and an AMX machine differed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ddcolor.color import rgb_uint8_to_lab

__all__ = [
    "AB_MAX",
    "AB_MIN",
    "L_SCALE",
    "ROW_GROUP_ROWS",
    "SHARD_SCHEMA",
    "SPLITS",
    "ShardRow",
    "decode_lab",
    "encode_lab",
    "split_for",
    "write_shard_file",
]

L_SCALE = 255.0 / 100.0  # stored L = round(L* x L_SCALE)
AB_MIN, AB_MAX = -128, 127  # stored ab = clamp(round(ab), AB_MIN, AB_MAX)

SHARD_SCHEMA = pa.schema(
    [
        pa.field("sha256", pa.string(), nullable=False, metadata={"doc": "hex sha256 of the source file bytes"}),
        pa.field("source_uri", pa.string(), nullable=False, metadata={"doc": "where the image came from"}),
        pa.field("split", pa.string(), nullable=False, metadata={"doc": "train | val, by hash"}),
        pa.field("height", pa.int32(), nullable=False, metadata={"doc": "stored image height, px"}),
        pa.field("width", pa.int32(), nullable=False, metadata={"doc": "stored image width, px"}),
        pa.field("L", pa.binary(), nullable=False, metadata={"doc": "uint8 H*W, L* x 255/100"}),
        pa.field("ab", pa.binary(), nullable=False, metadata={"doc": "int8 2*H*W planar, a* then b*, Lab units"}),
        pa.field("colorfulness", pa.float32(), nullable=False, metadata={"doc": "Hasler-Suesstrunk CF, 0..255 RGB"}),
        pa.field("low_colorfulness", pa.bool_(), nullable=False, metadata={"doc": "CF < data.min_colorfulness"}),
        pa.field("ingested_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

SPLITS = ("train", "val")


def split_for(sha256: str, val_fraction: float) -> str:
    """Deterministic train/val assignment from the content hash: stable across runs, machines and re-ingests."""
    return "val" if int(sha256[:8], 16) / 2**32 < val_fraction else "train"


def _unrounded(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (H, W, 3) -> float64 (3, H, W): L* x L_SCALE, a*, b*: the values `encode_lab` rounds."""
    lab = rgb_uint8_to_lab(torch.from_numpy(rgb).permute(2, 0, 1)[None], dtype=torch.float64)[0]
    lab[0] *= L_SCALE
    return lab.numpy()


def encode_lab(rgb: np.ndarray) -> tuple[bytes, bytes]:
    """sRGB uint8 (H, W, 3) -> (L bytes, ab bytes) in the shard encoding above; the same bytes on every CPU."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) sRGB, got {rgb.dtype} {rgb.shape}")
    lab = _unrounded(rgb)  # float64: see the module docstring for why not float32
    lightness = np.clip(np.rint(lab[0]), 0, 255).astype(np.uint8)
    ab = np.clip(np.rint(lab[1:]), AB_MIN, AB_MAX).astype(np.int8)
    return lightness.tobytes(), ab.tobytes()


def decode_lab(l_bytes: bytes, ab_bytes: bytes, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Shard bytes -> (L float32 (1, H, W) in [0, 100], ab float32 (2, H, W) in Lab units).

    Raises:
        ValueError: byte lengths that do not match height x width (a corrupt row).
    """
    if len(l_bytes) != height * width or len(ab_bytes) != 2 * height * width:
        raise ValueError(
            f"row has {len(l_bytes)} L / {len(ab_bytes)} ab bytes, expected {height * width} / "
            f"{2 * height * width} for {height}x{width}"
        )
    lightness = np.frombuffer(l_bytes, dtype=np.uint8).reshape(1, height, width).astype(np.float32) / L_SCALE
    ab = np.frombuffer(ab_bytes, dtype=np.int8).reshape(2, height, width).astype(np.float32)
    return lightness, ab


# --- writing ---------------------------------------------------------------------------------------------

ROW_GROUP_ROWS = 64  # rows per Parquet row group: small enough to stream, large enough to compress


@dataclass(frozen=True)
class ShardRow:
    """One row of `SHARD_SCHEMA` before it is written (height = width = the shard's size)."""

    sha256: str
    source_uri: str
    split: str
    L: bytes
    ab: bytes
    colorfulness: float
    low_colorfulness: bool


def write_shard_file(path: str | Path, rows: Iterable[ShardRow], size: int, ingested_at: datetime) -> int:
    """Stream ``rows`` into a Parquet shard at local ``path`` (zstd, row groups of `ROW_GROUP_ROWS`, statistics on
    the small columns); at most one row group is held in memory. Returns the number of rows written (0: no file).

    The bytes depend only on the rows, ``size`` and ``ingested_at``: the same inputs give the same file (and so the
    same content hash) on any machine and in any process.
    """
    import pyarrow.parquet as pq

    writer: pq.ParquetWriter | None = None
    written = 0
    batch: list[ShardRow] = []

    def flush() -> None:
        nonlocal writer
        if writer is None:
            writer = pq.ParquetWriter(
                str(path),
                SHARD_SCHEMA,
                compression="zstd",
                use_dictionary=["split"],
                write_statistics=["sha256", "split", "height", "width", "colorfulness", "low_colorfulness"],
            )
        n = len(batch)
        table = pa.Table.from_pydict(
            {
                "sha256": [r.sha256 for r in batch],
                "source_uri": [r.source_uri for r in batch],
                "split": [r.split for r in batch],
                "height": [size] * n,
                "width": [size] * n,
                "L": [r.L for r in batch],
                "ab": [r.ab for r in batch],
                "colorfulness": [r.colorfulness for r in batch],
                "low_colorfulness": [r.low_colorfulness for r in batch],
                "ingested_at": [ingested_at] * n,
            },
            schema=SHARD_SCHEMA,
        )
        writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        batch.clear()

    try:
        for row in rows:
            batch.append(row)
            written += 1
            if len(batch) >= ROW_GROUP_ROWS:
                flush()
        if batch:
            flush()
    finally:
        if writer is not None:
            writer.close()
    return written
