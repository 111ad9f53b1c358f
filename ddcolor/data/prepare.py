"""Image preparation for ingestion: file bytes -> one shard row (Lab bytes and colorfulness) or a reason to reject.

Pure per-image work, no storage and no dataset: `ddcolor.data.ingest_jobs` runs it on workers. The steps: decode
to 8-bit sRGB straight from the bytes (EXIF orientation, ICC -> sRGB, the decompression-bomb guard;
`ddcolor.imageio.read_rgb8_image`), reject images under `MIN_SIDE`, resize to ``data.size`` (`prepare_pixels`),
encode Lab in the shard encoding (`ddcolor.data.shards.encode_lab`, by look-up table once it pays:
`ddcolor.data.lab_lut`), and measure colorfulness on the stored image (`colorfulness_packed`).

The resize is PIL's antialiased bicubic (Keys a = -0.5, widened by the scale when shrinking; two passes with an
8-bit intermediate, in Pillow's order), computed by torch's uint8 kernel (``F.interpolate(..., mode="bicubic",
antialias=True)``): 2.3x faster than PIL's on a 500 x 375 photo, 8x on 2048 x 1536. The two differ only on values
about halfway between two levels (0.1-0.7% of them, by one level, rarely two; equally far from a float resize),
and torch gives the same bytes on its DEFAULT, AVX2 and AVX-512 code paths (tests/data/test_shards.py). torch reads
PIL's own 4-byte pixels (R, G, B, pad) in place, through Arrow and DLPack, resizes the pad as a fourth channel, and
returns packed 32-bit pixels ``R | G << 8 | B << 16``: the Lab table's index, read also by the colorfulness sums.
Images over `TORCH_RESIZE_MAX_BYTES` (about 4 megapixels), which PIL cannot share in one piece, PIL resizes itself.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from ddcolor.color import CF_MEAN_WEIGHT
from ddcolor.data.lab_lut import LabEncoder, pack_rgb, unpack_rgb
from ddcolor.imageio import IMAGE_EXTENSIONS, ImageReadError, read_image, read_rgb8_image, to_uint

__all__ = [
    "DRAFT_FACTOR",
    "MIN_SIDE",
    "TORCH_RESIZE_MAX_BYTES",
    "PrepareParams",
    "PreparedRow",
    "colorfulness_packed",
    "colorfulness_u8",
    "decode_image_bytes",
    "prepare_image",
    "prepare_pixels",
    "prepare_row",
    "resize_rgb8",
]

MIN_SIDE = 32  # px: inputs smaller than this on either side (after EXIF rotation) are quarantined

#: JPEG draft decoding (`ddcolor.imageio.read_rgb8`: 1/2, 1/4 or 1/8 scale in the DCT domain, keeping >= this
#: factor x the target side) is OFF (0): measured on 2048- and 4000-px JPEGs to 256 px it is 3-10x faster, but moves
#: stored values by up to 1.2 L* and 3 ab (mean 0.06 L*, 0.15 ab), more than the shard quantisation tolerance
#: (0.2 L*, 0.5 ab) that ingestion promises relative to a full decode. 2 is the setting that was measured.
DRAFT_FACTOR = 0

#: Images with more pixel bytes than this (4 a pixel in PIL; 16 MiB: about 4.2 megapixels, PIL's default memory
#: block) are resized by PIL itself: PIL keeps them in several blocks, so torch could only read a copy, and copying
#: 12 MP out (~45 ms here) costs as much as PIL's whole resize (~50 ms). Smaller ones torch reads in place.
TORCH_RESIZE_MAX_BYTES = 16 << 20


@dataclass(frozen=True)
class PrepareParams:
    """How a worker prepares an image, from ``params.yaml``'s ``data`` section.

    Attributes:
        size: output side, px (``data.size``). resize_mode: ``data.resize_mode``. max_pixels: the decode bomb guard
        (``data.max_image_pixels``; None: no limit). val_fraction: ``data.val_fraction`` (the split is a function of
        the content hash). min_colorfulness: ``data.min_colorfulness`` (rows below it are flagged, not dropped).
    """

    size: int
    resize_mode: str
    max_pixels: int | None
    val_fraction: float = 0.0
    min_colorfulness: float = 0.0


@dataclass(frozen=True)
class PreparedRow:
    """One image ready for a shard. L, ab: `ddcolor.data.shards.encode_lab` bytes of the (size, size) image;
    colorfulness: Hasler-Suesstrunk CF of that image (0..255 RGB)."""

    L: bytes
    ab: bytes
    colorfulness: float


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


def _bicubic(chw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (1, C, H, W) -> uint8 (1, C, height, width): antialiased bicubic in Pillow's pass order."""
    in_h, in_w = chw.shape[-2:]
    # torch filters the rows first; Pillow (13) filters the columns first when the height loses more than twice as
    # many pixels as the width. The first pass is rounded to 8 bits, so the order shows in the result: follow Pillow
    if in_h - height > 0 and in_h - height > 2 * (in_w - width) and width != in_w:
        chw = F.interpolate(chw, size=(height, in_w), mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(chw, size=(height, width), mode="bicubic", align_corners=False, antialias=True)


def _resize(chw: torch.Tensor, size: int, resize_mode: str) -> torch.Tensor:
    """uint8 (1, C, H, W) -> uint8 (C, size, size), a view of the resized image (see the module docstring).

    ``resize``: direct resize to size x size (the official recipe; aspect ratio not kept). ``center_crop``: the
    short side to ``size`` (aspect kept), then the central size x size square.
    """
    height, width = chw.shape[-2:]
    if resize_mode == "resize":
        out_h = out_w = size
    elif resize_mode == "center_crop":
        scale = size / min(width, height)
        out_w, out_h = max(size, round(width * scale)), max(size, round(height * scale))
    else:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; use 'resize' or 'center_crop'")
    out = _bicubic(chw, out_h, out_w)[0]
    top, left = (out_h - size) // 2, (out_w - size) // 2
    return out[:, top : top + size, left : left + size]


def prepare_image(rgb: np.ndarray | Image.Image, size: int, resize_mode: str) -> np.ndarray:
    """float or uint8 (H, W, 3) sRGB (float in [0, 1]), or a PIL image -> uint8 (size, size, 3) sRGB: the image a
    shard stores (`prepare_pixels`, unpacked)."""
    if isinstance(rgb, Image.Image):
        im = rgb if rgb.mode == "RGB" else rgb.convert("RGB")
    else:
        im = Image.fromarray(to_uint(rgb, 8) if rgb.dtype != np.uint8 else np.ascontiguousarray(rgb), mode="RGB")
    return unpack_rgb(prepare_pixels(im, size, resize_mode)).reshape(size, size, 3)


def resize_rgb8(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height, width, 3) with torch's resampling (the module docstring), as
    `prepare_pixels` applies it to images up to `TORCH_RESIZE_MAX_BYTES`."""
    chw = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    return _bicubic(chw, height, width)[0].permute(1, 2, 0).numpy().copy()


def _shared_rgbx(im: Image.Image) -> torch.Tensor:
    """PIL's own 4-byte pixels (R, G, B, pad) of an RGB image as a uint8 (H, W, 4) tensor: shared, not copied
    (Arrow, then DLPack), when PIL holds the image in one memory block; else a copy."""
    width, height = im.size
    try:
        values = pa.array(im).flatten()  # Pillow >= 11.2; "rows are not contiguous" for a multi-block image
    except (ValueError, TypeError, pa.ArrowException):
        return torch.frombuffer(bytearray(im.tobytes("raw", "RGBX")), dtype=torch.uint8).view(height, width, 4)
    return torch.from_dlpack(values).view(height, width, 4)  # read only: nothing here writes to it


def _pil_resize(im: Image.Image, size: int, resize_mode: str) -> Image.Image:
    """`_resize` done by PIL (the same filter, intermediate and pass order): for images over
    `TORCH_RESIZE_MAX_BYTES`."""
    width, height = im.size
    if resize_mode == "resize":
        return im.resize((size, size), Image.Resampling.BICUBIC)
    if resize_mode != "center_crop":
        raise ValueError(f"unknown resize_mode {resize_mode!r}; use 'resize' or 'center_crop'")
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return im.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))


def prepare_pixels(im: Image.Image, size: int, resize_mode: str) -> np.ndarray:
    """An RGB PIL image -> its stored (size, size) image as int32 (size*size,) packed pixels ``R | G << 8 | B << 16
    | pad << 24``, row-major (consumers mask the pad away; `prepare_image` unpacks them).

    Up to `TORCH_RESIZE_MAX_BYTES`, torch reads PIL's 4-byte pixels where they are and resizes the 4 channels
    (channels-last: the layout of its vectorised uint8 kernel; each channel on its own); larger images PIL resizes.
    The little-endian 32-bit view of the result puts R in the low byte on any machine.
    """
    if im.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {im.mode}")
    width, height = im.size
    if 4 * width * height > TORCH_RESIZE_MAX_BYTES:
        return np.frombuffer(_pil_resize(im, size, resize_mode).tobytes("raw", "RGBX"), dtype="<i4")
    out = _resize(_shared_rgbx(im).permute(2, 0, 1)[None], size, resize_mode).permute(1, 2, 0)  # (size, size, 4)
    return out.contiguous().numpy().view("<i4").reshape(-1)


def colorfulness_packed(pixels: np.ndarray) -> float:
    """`ddcolor.color.colorfulness_np` of an image given as packed pixels (`prepare_pixels`), in one integer pass
    (the same value to ~1e-12).

    rg = |R - G| and 2 yb = |R + G - 2B| are small integers, so their sums and sums of squares are exact; mean and
    population variance follow from them with one rounding each (Python integers), instead of two-pass float64
    statistics.
    """
    red = pixels & 255
    green = pixels >> 8
    green &= 255
    blue = pixels >> 16
    blue &= 255
    rg = red - green
    np.abs(rg, out=rg)
    yb2 = red + green  # 2 * yb
    yb2 -= blue
    yb2 -= blue
    np.abs(yb2, out=yb2)
    n = rg.size
    # squares fit int32 (<= 510^2), sums are taken in int64; no BLAS (its threads spin on a busy machine)
    s_rg, s_yb2 = int(rg.sum(dtype=np.int64)), int(yb2.sum(dtype=np.int64))
    rg *= rg
    yb2 *= yb2
    q_rg, q_yb2 = int(rg.sum(dtype=np.int64)), int(yb2.sum(dtype=np.int64))
    # n^2 var = n sum(x^2) - sum(x)^2, exactly; yb = yb2 / 2, so its moments take a factor 4
    var = (n * q_rg - s_rg * s_rg) / n**2 + (n * q_yb2 - s_yb2 * s_yb2) / (4 * n**2)
    mean2 = (s_rg / n) ** 2 + (s_yb2 / (2 * n)) ** 2
    return float(np.sqrt(var) + CF_MEAN_WEIGHT * np.sqrt(mean2))


def colorfulness_u8(img: np.ndarray) -> float:
    """`ddcolor.color.colorfulness_np` of a uint8 (H, W, 3) RGB image (`colorfulness_packed`)."""
    return colorfulness_packed(pack_rgb(img))


@functools.cache
def lab_encoder() -> LabEncoder:
    """This process's shard Lab encoder (`encode_lab` bytes; by table once enough images were encoded)."""
    return LabEncoder()


def prepare_row(data: bytes, name: str, params: PrepareParams) -> PreparedRow | str:
    """An image file's bytes -> its shard row, or the reason it is rejected (a bad file is never an exception).

    Args:
        data: the file content. name: its URI (for the format and messages). params: sizes and limits.
    """
    try:
        # straight from the bytes to 8-bit sRGB: no second read, no float32 copy
        rgb = read_rgb8_image(data, name, params.max_pixels, draft_side=DRAFT_FACTOR * params.size)
        width, height = rgb.size
        if min(height, width) < MIN_SIDE:
            return f"too small: {width}x{height} px; need at least {MIN_SIDE} px a side"
        pixels = prepare_pixels(rgb, params.size, params.resize_mode)
        lightness, ab = lab_encoder().encode_packed(pixels)  # == encode_lab of the (size, size, 3) image
        return PreparedRow(lightness, ab, colorfulness_packed(pixels))
    except ImageReadError as err:
        return _ingest_reason(err.reason)
    except Exception as err:  # one bad file never stops the run
        return f"cannot decode ({type(err).__name__}: {err})"
