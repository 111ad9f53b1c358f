"""Reading and writing image files for colorization, with PIL.

`read_image` turns any supported file into float sRGB plus what is needed to write the result back the same way
(alpha, bit depth, format, EXIF); `write_image` does the reverse. What is handled:

* formats: JPEG (also MPO, the multi-picture JPEG some cameras write), PNG, WebP, TIFF, BMP. Multi-frame files
  (animated PNG/WebP, multi-page TIFF) contribute their first frame.
* modes: grayscale, RGB, RGBA and LA (alpha kept), palette (with or without transparency), 1-bit, CMYK and
  YCbCr/LAB (converted to RGB), 16-bit grayscale (PIL modes ``I;16*`` and ``I``; written back as 16-bit RGB PNG
  or TIFF). PIL reads 16-bit-per-channel RGB(A) PNG and TIFF as 8-bit, so those come back as 8-bit output.
  32-bit float images (mode ``F``) are rejected.
* EXIF orientation: the pixels are rotated upright (`PIL.ImageOps.exif_transpose`) and the orientation tag of
  the kept EXIF is reset to 1.
* ICC profiles: an embedded profile that fits the image (RGB, gray or CMYK) is used to convert the pixels to
  sRGB with `PIL.ImageCms`; the output is written untagged, i.e. sRGB by convention. A profile that cannot be
  applied is ignored with a warning (the pixels are then taken as sRGB).
* bad files: missing, empty, truncated, non-image, unsupported, and images with more pixels than ``max_pixels``
  (the decompression-bomb guard) raise `ImageReadError` naming the file and the reason.

Arrays are channels-last numpy: ``rgb`` is float32 (H, W, 3) gamma-encoded sRGB in [0, 1], ``alpha`` is float32
(H, W) in [0, 1] (exact for 8- and 16-bit values: ``round(a * 255)`` gives back the stored integers).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

from ddcolor.errors import DDColorError
from ddcolor.storage import write_local_atomic

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FORMAT_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "LoadedImage",
    "default_max_pixels",
    "format_for_path",
    "normalize_format",
    "pil_to_float",
    "read_image",
    "read_rgb8",
    "read_rgb8_image",
    "to_uint",
    "write_image",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit (about 0.25 GB of 24-bit RGB)

#: PIL format name -> file extensions (the first is used for new files).
FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "PNG": (".png",),
    "WEBP": (".webp",),
    "TIFF": (".tif", ".tiff"),
    "BMP": (".bmp", ".dib"),
}
IMAGE_EXTENSIONS: frozenset[str] = frozenset(ext for exts in FORMAT_EXTENSIONS.values() for ext in exts)
_FORMAT_ALIASES = {"JPG": "JPEG", "MPO": "JPEG", "TIF": "TIFF"}
_SIXTEEN_BIT_FORMATS = ("PNG", "TIFF")  # the others store at most 8 bits per channel
_ALPHA_FORMATS = ("PNG", "WEBP", "TIFF", "BMP")
_EXIF_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF")
_GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_UINT16_MAX = 65535.0

# TIFF tags that describe the pixel layout of the file they were read from; they must not be copied into the
# EXIF of a new file (`Image.getexif()` of a TIFF returns them along with the descriptive tags).
_TIFF_STRUCTURE_TAGS = frozenset(
    {254, 255, 256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325, 338, 339, 530}
    | {531, 532, 34675}  # YCbCr subsampling/positioning, reference black/white, ICC profile
)


class ImageReadError(DDColorError):
    """A file that cannot be used as an input image.

    Attributes:
        path: the file.
        reason: what is wrong, in words (e.g. "empty file (0 bytes)").
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class LoadedImage:
    """An image file decoded for colorization.

    Attributes:
        rgb: float32 (H, W, 3) sRGB in [0, 1], upright (EXIF orientation applied), ICC profile applied.
            Grayscale files give three equal channels.
        alpha: float32 (H, W) in [0, 1], or None when the file has no transparency.
        bit_depth: 8 or 16 bits per channel of the source pixels (16 only for 16-bit grayscale).
        format: PIL format name of the file content: "JPEG", "PNG", "WEBP", "TIFF" or "BMP".
        exif: EXIF block to write back (orientation reset to 1), or None.
        icc_profile: the ICC profile the file carried (already applied to ``rgb``), or None.
        mode: the PIL mode of the file (e.g. "L", "RGBA", "I;16", "CMYK").
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    format: str
    exif: bytes | None = None
    icc_profile: bytes | None = None
    mode: str = "RGB"

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.rgb.shape[0], self.rgb.shape[1]


# --- formats ---------------------------------------------------------------------------------------------
def normalize_format(name: str) -> str:
    """Canonical PIL format name for a user-given format or extension ("jpg", ".TIF", "png" -> "PNG").

    Raises:
        ValueError: not one of the supported formats.
    """
    key = name.strip().lstrip(".").upper()
    key = _FORMAT_ALIASES.get(key, key)
    if key in FORMAT_EXTENSIONS:
        return key
    for fmt, exts in FORMAT_EXTENSIONS.items():
        if f".{key.lower()}" in exts:
            return fmt
    raise ValueError(f"unsupported image format {name!r}; use one of: png, jpg, webp, tif, bmp")


def format_for_path(path: str | os.PathLike[str]) -> str | None:
    """The format a file name's extension stands for, or None for an unknown extension."""
    suffix = Path(path).suffix.lower()
    return next((fmt for fmt, exts in FORMAT_EXTENSIONS.items() if suffix in exts), None)


def default_max_pixels() -> int | None:
    """The decompression-bomb limit to use when none is given: ``data.max_image_pixels`` of the configuration.

    Reads ``params.yaml`` in the working directory when there is one (None there means no limit), else the field's
    default in `ddcolor.config`, else PIL's default 89,478,485.
    """
    from ddcolor import config

    if Path("params.yaml").is_file():
        try:
            return config.load_config("params.yaml").data.max_image_pixels
        except Exception as err:  # a broken params.yaml must not stop colorization; say so and go on
            log.warning("params.yaml not usable for data.max_image_pixels (%s); using the default", err)
    field = config.DataConfig.model_fields.get("max_image_pixels")
    return field.default if field is not None else DEFAULT_MAX_PIXELS


# --- reading ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Set PIL's decompression-bomb limit to ``max_pixels`` and turn its warning into an error, then restore."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _profile_space(profile: ImageCms.ImageCmsProfile) -> str:
    return profile.profile.xcolor_space.strip().upper()  # "RGB", "GRAY", "CMYK", ...


def _to_srgb(im: Image.Image, icc: bytes) -> Image.Image | None:
    """Convert a color-only image (L, RGB or CMYK) tagged with ``icc`` to sRGB RGB; None if that cannot be done."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ImageCms.PyCMSError) as err:
        log.warning("ignoring an unreadable ICC profile (%s); taking the pixels as sRGB", err)
        return None
    space = _profile_space(source)
    expected = {"L": "GRAY", "RGB": "RGB", "CMYK": "CMYK"}.get(im.mode)
    if space != expected:
        log.warning("ignoring a %s ICC profile on a %s image; taking the pixels as sRGB", space, im.mode)
        return None
    try:
        return ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except ImageCms.PyCMSError as err:
        log.warning("could not apply the ICC profile (%s); taking the pixels as sRGB", err)
        return None


def pil_to_float(im: Image.Image, apply_icc: bool = True) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Decode a PIL image into float sRGB, alpha and bit depth (no EXIF rotation: see `read_image`).

    Args:
        im: any PIL image of a supported mode (see the module docstring).
        apply_icc: convert to sRGB with the image's ``icc_profile`` (``im.info``) when it has one.

    Returns:
        ``(rgb, alpha, bit_depth)``: float32 (H, W, 3) in [0, 1]; float32 (H, W) in [0, 1] or None; 8 or 16.

    Raises:
        ValueError: an unsupported mode (32-bit float).
    """
    mode = im.mode
    icc = im.info.get("icc_profile") if apply_icc else None
    if mode in _GRAY16_MODES:
        if icc:
            log.warning("ICC profiles are not applied to 16-bit grayscale images; taking the pixels as sRGB")
        gray = np.asarray(im).astype(np.float32)
        if gray.min() < 0 or gray.max() > _UINT16_MAX:
            log.warning("%s image has values outside [0, 65535]; clipping", mode)
            gray = gray.clip(0, _UINT16_MAX)
        gray /= _UINT16_MAX
        return np.repeat(gray[:, :, None], 3, axis=2), None, 16
    if mode == "F":
        raise ValueError("32-bit float images (PIL mode F) are not supported; convert to 8- or 16-bit first")

    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("La", "LA"):
        im = im.convert("LA")
    elif mode in ("RGBa", "RGBA"):
        im = im.convert("RGBA")
    elif mode not in ("L", "RGB", "CMYK"):
        im = im.convert("RGB")  # RGBX, YCbCr, LAB, HSV, ...

    alpha = None
    if im.mode in ("LA", "RGBA"):
        alpha = np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
        im = im.convert(im.mode[:-1])
    if icc:
        converted = _to_srgb(im, icc)
        if converted is not None:
            im = converted
    if im.mode != "L":
        im = im.convert("RGB")  # CMYK without a usable profile: PIL's naive conversion
    arr = np.asarray(im, dtype=np.float32) / 255.0
    rgb = np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr
    return np.ascontiguousarray(rgb), alpha, 8


def _upright_exif(im: Image.Image, fmt: str) -> bytes | None:
    """The image's EXIF with the orientation reset to 1 (pixels are rotated upright), or None if it has none."""
    try:
        exif = im.getexif()
        if fmt == "TIFF":
            for tag in _TIFF_STRUCTURE_TAGS & set(exif):
                del exif[tag]
        if len(exif) == 0:
            return None
        if ExifTags.Base.Orientation in exif:
            exif[ExifTags.Base.Orientation] = 1
        return exif.tobytes()
    except Exception as err:  # malformed EXIF is common; the pixels are still fine
        log.warning("dropping unreadable EXIF (%s: %s)", type(err).__name__, err)
        return None


@contextlib.contextmanager
def _opened(source: str | os.PathLike[str] | io.BytesIO, name: str | os.PathLike[str], max_pixels: int | None):
    """Open ``source`` with PIL (format and pixel-count checked, not yet decoded) and map every failure, also those
    raised while the caller decodes inside the ``with`` block, to an `ImageReadError` naming ``name``.

    Yields:
        (image, format): the open PIL image and its canonical format name ("JPEG", "PNG", ...).
    """
    limit = f"--max-pixels limit of {max_pixels:,}" if max_pixels else "pixel limit"
    hint = "Raise --max-pixels (0 = no limit) if you trust the file."
    with _pixel_limit(max_pixels):
        try:
            with Image.open(source) as im:
                fmt = _FORMAT_ALIASES.get(im.format or "", im.format or "")
                if fmt not in FORMAT_EXTENSIONS:
                    raise ImageReadError(name, f"unsupported format {im.format}; supported: JPEG, PNG, WebP, TIFF, BMP")
                width, height = im.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageReadError(
                        name, f"too large: {width}x{height} = {width * height:,} pixels exceeds the {limit}. {hint}"
                    )
                if getattr(im, "n_frames", 1) > 1:
                    log.info("%s has %d frames; colorizing the first", name, im.n_frames)
                yield im, fmt
        except ImageReadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageReadError(name, f"too large (decompression-bomb guard, {limit}): {err} {hint}") from None
        except UnidentifiedImageError:
            raise ImageReadError(name, "not an image, or an unsupported format (PIL cannot identify it)") from None
        except MemoryError:
            raise ImageReadError(
                name, "out of memory while decoding; lower --max-pixels or use a bigger machine"
            ) from None
        except ValueError as err:
            raise ImageReadError(name, str(err)) from None
        except Exception as err:  # PIL signals corrupt data with OSError, SyntaxError, EOFError, struct.error, ...
            raise ImageReadError(name, f"truncated or corrupt image data ({type(err).__name__}: {err})") from None


def read_image(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read an image file for colorization.

    Args:
        path: the file.
        max_pixels: decompression-bomb guard: larger images (width x height) are refused; None = no limit.

    Returns:
        The decoded `LoadedImage` (upright, sRGB).

    Raises:
        ImageReadError: the file is missing, empty, not an image, of an unsupported format or mode, truncated or
            corrupt, or over ``max_pixels``. The message names the file and the reason.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageReadError(path, "is a directory")
    try:
        nbytes = path.stat().st_size
    except OSError as err:
        raise ImageReadError(path, f"cannot access: {err.strerror or err}") from None
    if nbytes == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    with _opened(path, path, max_pixels) as (im, fmt):
        im.load()
        icc = im.info.get("icc_profile") or None
        upright = ImageOps.exif_transpose(im)
        exif = _upright_exif(im, fmt)  # after the transpose: this edits the EXIF that `im` holds
        rgb, alpha, bit_depth = pil_to_float(upright)
        return LoadedImage(rgb, alpha, bit_depth, fmt, exif=exif, icc_profile=icc, mode=im.mode)


def read_rgb8(
    data: bytes, name: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS, draft_side: int = 0
) -> np.ndarray:
    """Decode image file bytes straight to 8-bit sRGB: what dataset ingestion needs, without a float copy.

    The same pixels as ``to_uint(read_image(file).rgb, 8)`` (EXIF orientation, ICC -> sRGB, alpha dropped, 16-bit
    gray rounded to 8 bits), the same `ImageReadError` reasons (naming ``name``), but 8-bit sources (nearly all
    photos) never go through float32.

    Args:
        data: the file's bytes. name: the file (for messages). max_pixels: bomb guard (None = no limit).
        draft_side: when > 0 and the file is a JPEG whose both sides are at least twice this, let the JPEG decoder
            scale down by 1/2, 1/4 or 1/8 in the DCT domain (`PIL.Image.Image.draft`), keeping both sides >=
            ``draft_side``. Much faster for photos far larger than the target; the pixels then differ from a full
            decode by about one 8-bit level after a later resize to at most half of ``draft_side``.

    Returns:
        uint8 (H, W, 3) sRGB, upright.
    """
    return np.array(read_rgb8_image(data, name, max_pixels, draft_side), dtype=np.uint8)


def read_rgb8_image(
    data: bytes, name: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS, draft_side: int = 0
) -> Image.Image:
    """`read_rgb8` as a decoded PIL image of mode ``RGB`` (saves a copy when the next step is a PIL resize)."""
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)")
    with _opened(io.BytesIO(data), name, max_pixels) as (im, fmt):
        if draft_side > 0 and fmt == "JPEG" and min(im.size) >= 2 * draft_side:
            im.draft(None, (draft_side, draft_side))
        im.load()
        # in place: without an orientation tag the copy exif_transpose would return is one full frame for nothing
        ImageOps.exif_transpose(im, in_place=True)
        if im.mode not in ("L", "RGB", "CMYK"):  # palette, alpha, 16-bit, ...: the general path
            rgb, _, _ = pil_to_float(im)
            return Image.fromarray(to_uint(rgb, 8), mode="RGB")
        upright = im
        icc = upright.info.get("icc_profile")
        if icc:
            upright = _to_srgb(upright, icc) or upright
        if upright.mode != "RGB":
            upright = upright.convert("RGB")  # gray: three equal channels; CMYK without a usable profile: naive
        # leaving `with Image.open(...)` closes the file only (Image.close(), never called here, drops the pixels)
        return upright


# --- writing ---------------------------------------------------------------------------------------------
def to_uint(x: np.ndarray, bit_depth: int) -> np.ndarray:
    """Quantise float values in [0, 1] to uint8 (``bit_depth`` 8) or uint16 (16), rounding to nearest."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    top = 255.0 if bit_depth == 8 else _UINT16_MAX
    return np.rint(np.clip(x, 0.0, 1.0) * top).astype(np.uint8 if bit_depth == 8 else np.uint16)


def _png16(arr: np.ndarray, exif: bytes | None) -> bytes:
    """Encode a uint16 (H, W, 3|4) array as a 16-bit RGB(A) PNG (PIL cannot write those)."""
    height, width, channels = arr.shape
    rows = arr.astype(">u2").reshape(height, width * channels).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    color_type = 2 if channels == 3 else 6
    parts = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0))]
    if exif:
        parts.append(chunk(b"eXIf", exif.removeprefix(b"Exif\x00\x00")))
    parts += [chunk(b"IDAT", zlib.compress(raw, 6)), chunk(b"IEND", b"")]
    return b"".join(parts)


def write_image(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    bit_depth: int = 8,
    format: str | None = None,
    exif: bytes | None = None,
    quality: int = 95,
) -> Path:
    """Write an RGB(A) image, atomically.

    Args:
        path: target file; parent folders are created.
        rgb: (H, W, 3) float sRGB in [0, 1] (quantised to ``bit_depth``), or uint8 / uint16 (written as they are,
            the dtype then sets the bit depth).
        alpha: (H, W) alpha, float in [0, 1] or integers of the same dtype as ``rgb``; None = opaque. Dropped, with
            a warning, for JPEG.
        bit_depth: 8 or 16; 16 is kept for PNG and TIFF, other formats get 8 bits.
        format: PIL format name or extension ("PNG", "jpg", ...); None = from the extension of ``path``.
        exif: EXIF block to embed (JPEG, PNG, WebP, TIFF; not BMP, not 16-bit TIFF).
        quality: JPEG / WebP quality.

    Returns:
        ``path`` as a `Path`.

    Raises:
        ValueError: unknown format, or arrays of the wrong shape.
        OSError: the file cannot be written.
    """
    path = Path(path)
    fmt = normalize_format(format) if format else format_for_path(path)
    if fmt is None:
        raise ValueError(f"{path}: cannot tell the image format from the extension; pass format=")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be (H, W, 3), got {rgb.shape}")
    if alpha is not None and alpha.shape != rgb.shape[:2]:
        raise ValueError(f"alpha must be (H, W) = {rgb.shape[:2]}, got {alpha.shape}")
    if rgb.dtype in (np.uint8, np.uint16):
        bit_depth = 8 if rgb.dtype == np.uint8 else 16
    if bit_depth == 16 and fmt not in _SIXTEEN_BIT_FORMATS:
        log.info("%s stores 8 bits per channel; writing %s as 8-bit", fmt, path)
        bit_depth = 8
    if alpha is not None and fmt not in _ALPHA_FORMATS:
        log.warning("%s has no alpha channel; dropping the transparency of %s", fmt, path)
        alpha = None

    def quantise(x: np.ndarray) -> np.ndarray:
        if x.dtype == np.uint16 and bit_depth == 8:
            return (x.astype(np.uint32) * 255 // 65535).astype(np.uint8)  # exact for values that came from 8-bit
        if x.dtype == np.uint8 and bit_depth == 16:
            return x.astype(np.uint16) * 257
        return x if x.dtype in (np.uint8, np.uint16) else to_uint(x, bit_depth)

    pixels = quantise(rgb)
    if alpha is not None:
        pixels = np.concatenate([pixels, quantise(alpha)[:, :, None]], axis=2)
    pixels = np.ascontiguousarray(pixels)
    exif = exif if fmt in _EXIF_FORMATS else None

    if bit_depth == 16 and fmt == "PNG":
        data = _png16(pixels, exif)
        write_local_atomic(path, lambda tmp: Path(tmp).write_bytes(data))
        return path
    if bit_depth == 16:  # TIFF
        import tifffile  # a scikit-image dependency; PIL cannot write 16-bit RGB

        extra = {"extrasamples": ("unassalpha",)} if alpha is not None else {}
        write_local_atomic(path, lambda tmp: tifffile.imwrite(tmp, pixels, photometric="rgb", metadata=None, **extra))
        return path

    im = Image.fromarray(pixels)  # RGB or RGBA from the channel count
    options: dict[str, object] = {}
    if fmt == "JPEG":
        options = {"quality": quality, "subsampling": 0}
    elif fmt == "WEBP":
        options = {"quality": quality}
    elif fmt == "TIFF":
        options = {"compression": "tiff_lzw"}
    if exif:
        options["exif"] = exif
    write_local_atomic(path, lambda tmp: im.save(tmp, format=fmt, **options))
    return path
