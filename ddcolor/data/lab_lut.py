"""A 2^24-entry table of the shard Lab encoding: `ddcolor.data.shards.encode_lab` of every 8-bit sRGB color.

Ingestion encodes every pixel of every image with `encode_lab` (float64 CIELAB, then rounding: see
`ddcolor.data.shards`). That costs about 8 ms for a 256 x 256 image on one core, more than decoding the JPEG. The
encoding is per pixel, so it is a pure function of the 8-bit color: this module evaluates `encode_lab` once on all
2^24 colors and then encodes an image by table look-up (about 0.5 ms at 256 px). The bytes are those of
`encode_lab` on this machine, by construction: the table is built by `encode_lab` itself, and every load checks it
against `encode_lab` on 4,096 fixed colors, so a table from older code is never used.

The table is indexed by the packed pixel ``R | G << 8 | B << 16``: the little-endian 32-bit value of a 4-byte
R, G, B, pad pixel with the pad masked (`pack_rgb`; ingestion's resize returns such pixels,
`ddcolor.data.prepare.prepare_pixels`), so that an image becomes table indices with one mask, no per-channel
shifts.

Cost: 64 MiB (2^24 entries of 4 bytes: L, a, b and a pad byte, so that one look-up is one aligned 32-bit load;
three separate planes were twice as slow), about 2-3 s of one core to build. The table is cached on disk, in
``$DDCOLOR_CACHE_DIR/lab_lut`` (default ``~/.cache/ddcolor/lab_lut``), under a key made of the source code of
`ddcolor.data.shards` and `ddcolor.color`, the numpy and torch versions and the table's layout, and memory-mapped
(worker processes share the page cache). Without a cached table, `LabEncoder` encodes directly and builds the table
only after ``build_after`` images in one process, so a small ingest never pays for it.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from pathlib import Path

import numpy as np

from ddcolor import storage
from ddcolor.data import shards

__all__ = ["LabEncoder", "build_table", "cache_path", "load_or_build", "pack_rgb", "unpack_rgb"]

log = logging.getLogger(__name__)

_COLORS = 1 << 24
_CHUNK_BLUE = 16  # blue values per build chunk: 16 x 256 x 256 colors, ~100 MB of float64 temporaries
_LAYOUT = "index R | G << 8 | B << 16; entry L, a, b, 0"  # part of the cache key: a new layout is a new file
_PIXEL_MASK = 0xFFFFFF  # the R, G, B bytes of a packed pixel (the top byte is PIL's pad)


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) sRGB -> int32 (H*W,) packed pixels ``R | G << 8 | B << 16`` (the table's index)."""
    flat = rgb.reshape(-1, 3)
    packed = flat[:, 2].astype(np.int32) << 16
    packed |= flat[:, 1].astype(np.int32) << 8
    packed |= flat[:, 0]
    return packed


def unpack_rgb(pixels: np.ndarray) -> np.ndarray:
    """int32 (N,) packed pixels (any top byte) -> uint8 (N, 1, 3) sRGB, the layout `encode_lab` takes."""
    rgb = np.stack([pixels & 255, (pixels >> 8) & 255, (pixels >> 16) & 255], axis=-1)
    return rgb.astype(np.uint8).reshape(-1, 1, 3)


def cache_path() -> Path:
    """Where the table of the current code lives: ``$DDCOLOR_CACHE_DIR/lab_lut/lab_lut-KEY.npy``."""
    import torch

    from ddcolor import color

    digest = hashlib.sha256()
    for part in (inspect.getsource(shards), inspect.getsource(color), np.__version__, torch.__version__, _LAYOUT):
        digest.update(part.encode())
    root = os.environ.get("DDCOLOR_CACHE_DIR")
    folder = (Path(root) if root else Path.home() / ".cache" / "ddcolor") / "lab_lut"
    return folder / f"lab_lut-{digest.hexdigest()[:16]}.npy"


def build_table() -> np.ndarray:
    """(2^24, 4) uint8: stored L, a (int8 bits), b (int8 bits), 0 of `encode_lab` for color R | G << 8 | B << 16."""
    table = np.zeros((_COLORS, 4), dtype=np.uint8)
    chunk = _CHUNK_BLUE << 16
    for start in range(0, _COLORS, chunk):
        l_bytes, ab_bytes = shards.encode_lab(unpack_rgb(np.arange(start, start + chunk, dtype=np.int32)))
        table[start : start + chunk, 0] = np.frombuffer(l_bytes, dtype=np.uint8)
        ab = np.frombuffer(ab_bytes, dtype=np.uint8).reshape(2, chunk)
        table[start : start + chunk, 1], table[start : start + chunk, 2] = ab[0], ab[1]
    return table


def _probe_colors() -> np.ndarray:
    """4,096 fixed colors (uint8 (64, 64, 3)): random ones plus the gray axis and the primaries' extremes."""
    rgb = np.random.default_rng(20240614).integers(0, 256, size=(64 * 64, 3), dtype=np.uint8)
    rgb[:256] = np.arange(256, dtype=np.uint8)[:, None]
    rgb[256:264] = [[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)]
    return rgb.reshape(64, 64, 3)


def _matches_encode_lab(table: np.ndarray) -> bool:
    probe = _probe_colors()
    return _lookup(table, pack_rgb(probe)) == shards.encode_lab(probe)


def _lookup(table: np.ndarray, pixels: np.ndarray) -> tuple[bytes, bytes]:
    """int32 (N,) packed pixels -> (L bytes, ab bytes) by table."""
    # one 32-bit gather per pixel (the view round trip keeps the table's byte order on any machine)
    entries = table.view(np.uint32).reshape(-1).take(pixels & _PIXEL_MASK).view(np.uint8).reshape(-1, 4)
    return entries[:, 0].tobytes(), entries[:, 1:3].T.tobytes()


def load_or_build(build: bool = True) -> np.ndarray | None:
    """The table of the current code: memory-mapped from the cache, else (``build``) built and cached, else None.

    A cache file that cannot be read, has the wrong shape or disagrees with `encode_lab` is rebuilt. A cache folder
    that cannot be written only costs the rebuild next time (logged).
    """
    path = cache_path()
    if path.is_file():
        try:
            table = np.load(path, mmap_mode="r")
            if table.shape == (_COLORS, 4) and table.dtype == np.uint8 and _matches_encode_lab(table):
                return table
            log.warning("%s does not match encode_lab; rebuilding it", path)
        except (OSError, ValueError) as err:
            log.warning("cannot read the Lab table %s (%s); rebuilding it", path, err)
    if not build:
        return None
    table = build_table()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to a name
            np.save(fh, table)

    try:
        storage.write_local_atomic(path, write)  # atomic: concurrent builders write the same bytes
    except OSError as err:
        log.info("could not cache the Lab table in %s (%s); it is rebuilt per process", path.parent, err)
    return table


class LabEncoder:
    """`encode_lab` for many images in one process: by table once it pays (the same bytes either way).

    Args:
        build_after: images encoded directly before the table is built (when no cached table exists); 0 builds at
            the first image, None never builds (then a cached table is still used).
    """

    def __init__(self, build_after: int | None = 256) -> None:
        self.build_after = build_after
        self.encoded = 0
        self.table: np.ndarray | None = None
        self._looked = False

    def __call__(self, rgb: np.ndarray) -> tuple[bytes, bytes]:
        """sRGB uint8 (H, W, 3) -> (L bytes, ab bytes), exactly `ddcolor.data.shards.encode_lab`."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            return shards.encode_lab(rgb)  # its error message
        return self.encode_packed(pack_rgb(rgb))

    def encode_packed(self, pixels: np.ndarray) -> tuple[bytes, bytes]:
        """int32 (H*W,) packed pixels ``R | G << 8 | B << 16`` (the top byte is ignored), row-major -> (L bytes,
        ab bytes), exactly `ddcolor.data.shards.encode_lab` of the (H, W, 3) image."""
        if self.table is None:
            build = self.build_after is not None and self.encoded >= self.build_after
            if build or not self._looked:
                self.table = load_or_build(build=build)
                self._looked = True
        self.encoded += 1
        if self.table is None:
            return shards.encode_lab(unpack_rgb(pixels))  # (N, 1, 3): the same row-major bytes as (H, W, 3)
        return _lookup(self.table, pixels)
