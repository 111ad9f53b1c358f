"""The small built-in sample images: real photos shipped with scikit-image, plus deterministic variants of them.

`ddcolor samples --out data/raw --count N` (the first DVC stage) writes N distinct JPEG files so that
``dvc repro`` works on a fresh machine without downloading anything. The photos are the color photos that
scikit-image ships inside its wheel (those that load offline: `available_photos`). Image ``i`` is photo
``i % P`` (P photos) as is (long side at most 512 px) for ``i < P``, else a variant of it: a crop of 55-95 % of
each side, a horizontal flip on odd variants and a rescale to a long side of 256-512 px. The crop box and size
come from a sha256 of ``(photo, variant)``, not a random generator, so they never change between library versions.

Deterministic bytes: the same ``count`` gives the same files, byte for byte, for the same scikit-image and Pillow
versions (JPEG quality 90, 4:2:0 chroma subsampling, baseline, no EXIF, no timestamps); image ``i`` does not depend
on ``count`` (a larger N only adds files). That keeps the DVC hash of ``data/raw`` stable.

Names: ``0000_astronaut.jpg`` (a photo), ``0008_astronaut_v1.jpg`` (its first variant), ...

Example::

    from ddcolor.data.samples import write_samples
    write_samples("data/raw", count=48)     # or an s3://bucket/prefix
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ddcolor import storage
from ddcolor._optional import require

__all__ = [
    "DEFAULT_COUNT",
    "JPEG_QUALITY",
    "MAX_SIDE",
    "MIN_SIDE",
    "PHOTOS",
    "SampleImage",
    "available_photos",
    "sample_images",
    "write_samples",
]

log = logging.getLogger(__name__)

#: Color photos shipped inside the scikit-image wheel (no download); the order fixes the file order.
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)
DEFAULT_COUNT = 48
JPEG_QUALITY = 90
MAX_SIDE = 512  # px: long side of every image at most this
MIN_SIDE = 256  # px: long side of a variant at least this
CROP_RANGE = (0.55, 0.95)  # fraction of each side a variant keeps
_NAME = re.compile(r"^\d{4,}_[a-z_]+?(?:_v\d+)?\.jpg$")  # files `write_samples` owns (stale ones are removed)


@dataclass(frozen=True)
class SampleImage:
    """One sample file.

    Attributes:
        name: file name, e.g. ``0008_astronaut_v1.jpg``.
        photo: the scikit-image photo it comes from. variant: 0 = the photo itself, k > 0 = its k-th variant.
        width, height: pixel size. data: the JPEG bytes.
    """

    name: str
    photo: str
    variant: int
    width: int
    height: int
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _load_photo(name: str) -> np.ndarray:
    skimage_data = require("skimage.data", "train", "the built-in sample photos")
    arr = getattr(skimage_data, name)()
    if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity)
        arr = arr[0]
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[2] < 3 or arr.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is not an 8-bit color photo (shape {arr.shape}, {arr.dtype})")
    return np.ascontiguousarray(arr[..., :3])


@functools.cache
def _photo(name: str) -> Image.Image:
    return Image.fromarray(_load_photo(name), mode="RGB")


@functools.lru_cache(maxsize=1)
def available_photos(names: Sequence[str] = PHOTOS) -> tuple[str, ...]:
    """The photos of ``names`` that load here without a network (in order).

    Raises:
        RuntimeError: none loads (scikit-image missing or broken).
    """
    out = []
    for name in names:
        try:
            _photo(name)
        except Exception as err:  # a photo that needs pooch/network, or a removed one
            log.info("sample photo %s is not available offline (%s: %s); skipped", name, type(err).__name__, err)
        else:
            out.append(name)
    if not out:
        raise RuntimeError(
            "no scikit-image sample photo loads offline; install scikit-image (it ships astronaut, coffee, ...)"
        )
    return tuple(out)


def _fractions(photo: str, variant: int, n: int) -> list[float]:
    """``n`` numbers in [0, 1) derived from sha256(photo, variant): stable across library versions."""
    digest = hashlib.sha256(f"ddcolor-samples:{photo}:{variant}".encode()).digest()
    return [int.from_bytes(digest[4 * i : 4 * i + 4], "big") / 2**32 for i in range(n)]


def _scaled(im: Image.Image, long_side: int) -> Image.Image:
    width, height = im.size
    scale = long_side / max(width, height)
    if scale == 1:
        return im
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return im.resize(size, Image.Resampling.LANCZOS)


def _variant(photo: str, variant: int) -> Image.Image:
    im = _photo(photo)
    if variant == 0:
        return _scaled(im, min(MAX_SIDE, max(im.size)))
    fw, fh, fx, fy, flip, fs = _fractions(photo, variant, 6)
    lo, hi = CROP_RANGE
    width, height = im.size
    cw, ch = round(width * (lo + (hi - lo) * fw)), round(height * (lo + (hi - lo) * fh))
    left, top = round((width - cw) * fx), round((height - ch) * fy)
    out = im.crop((left, top, left + cw, top + ch))
    if variant % 2 == 1 or flip < 0.25:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _scaled(out, MIN_SIDE + round((MAX_SIDE - MIN_SIDE) * fs))


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2, optimize=False, progressive=False)
    return buf.getvalue()


def sample_images(count: int = DEFAULT_COUNT) -> list[SampleImage]:
    """The first ``count`` sample images (deterministic; distinct bytes).

    Raises:
        ValueError: ``count`` < 1. RuntimeError: no photo loads.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    photos = available_photos()
    out: list[SampleImage] = []
    seen: set[str] = set()
    for i in range(count):
        photo, variant = photos[i % len(photos)], i // len(photos)
        im = _variant(photo, variant)
        name = f"{i:04d}_{photo}" + (f"_v{variant}" if variant else "") + ".jpg"
        sample = SampleImage(name, photo, variant, im.size[0], im.size[1], _jpeg(im))
        if sample.sha256 in seen:  # pragma: no cover - two identical crops would need a sha256 collision
            raise RuntimeError(f"sample {name} duplicates an earlier one")
        seen.add(sample.sha256)
        out.append(sample)
    return out


def write_samples(out: str | os.PathLike[str], count: int = DEFAULT_COUNT) -> list[str]:
    """Write the first ``count`` sample images into ``out`` (a local folder or ``s3://`` prefix); return their URIs.

    Files of an earlier run that this one does not write (``NNNN_<photo>[_vK].jpg`` names only, e.g. after a
    smaller ``count``) are deleted; other files are left alone.
    """
    out = str(out)
    samples = sample_images(count)
    written = []
    for sample in samples:
        uri = storage.join(out, sample.name)
        storage.write_bytes(uri, sample.data)
        written.append(uri)
    keep = set(written)
    try:
        existing = storage.list_files(out, suffixes=[".jpg"])
    except storage.StorageNotFoundError:
        existing = []
    parent = storage.join(out, "_")[:-1]  # "data/raw/" or "s3://bucket/prefix/": files directly in OUT
    for uri in existing:
        rel = uri[len(parent) :] if uri.startswith(parent) else ""
        if uri not in keep and _NAME.match(rel):
            storage.delete(uri)
            log.info("removed stale sample %s", uri)
    log.info("wrote %d sample images (%d photos) to %s", len(written), len(available_photos()), out)
    return written
