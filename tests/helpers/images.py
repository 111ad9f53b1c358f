"""Image files for tests: random colorful images and a corpus of every kind of good and bad input.

    corpus = make_image_corpus(tmp_path / "corpus")   # ImageCorpus: .root, .good, .bad {path: reason keyword}, ...
    paths = make_random_images(tmp_path / "raw", 8)   # 8 distinct PNGs

The imageio helpers (`photo`, `make_icc`, `read_png16`, `load`, `save`, `bad_image_files`) are shared by the imageio
and colorize tests.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image


@dataclass
class ImageCorpus:
    """Files written by `make_image_corpus`.

    Attributes:
        root: the folder (all files are directly in it, plus ``sub/`` for one good image).
        good: files every reader must accept (RGB photos, random colors, gray photo, CMYK JPEG, 16-bit gray PNG,
            palette PNG, RGBA PNG, EXIF-rotated JPEG), all at least `min_side` px on each side.
        bad: file -> keyword expected (case-insensitive) in the rejection reason.
        max_pixels: the decompression-bomb limit the ``bomb.png`` file exceeds (good files are below it).
        min_side: the ``tiny.png`` file is smaller than this on both sides (16x16).
        gray: the grayscale photo (low colorfulness); colorful: files with high colorfulness.
        rotated: the EXIF-rotated JPEG (stored 96 wide x 64 high, orientation 6: upright it is 64 wide x 96 high).
    """

    root: Path
    good: list[Path] = field(default_factory=list)
    bad: dict[Path, str] = field(default_factory=dict)
    max_pixels: int = 128 * 128
    min_side: int = 32
    gray: Path | None = None
    colorful: list[Path] = field(default_factory=list)
    rotated: Path | None = None

    @property
    def all(self) -> list[Path]:
        return sorted([*self.good, *self.bad])


def _sample(name: str, width: int, height: int) -> Image.Image:
    """A scikit-image sample photo resized small (falls back to a smooth color gradient if unavailable)."""
    try:
        import skimage.data

        arr = getattr(skimage.data, name)()
        im = Image.fromarray(arr)
    except Exception:  # pragma: no cover - skimage data missing
        yy, xx = np.mgrid[0:height, 0:width]
        arr = np.stack([xx * 255 // width, yy * 255 // height, 128 + 0 * xx], axis=-1).astype(np.uint8)
        im = Image.fromarray(arr)
    return im.resize((width, height), Image.Resampling.BILINEAR)


def random_color_image(seed: int, width: int = 64, height: int = 48) -> Image.Image:
    """A colorful image of random 8x8-px color blocks (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    arr = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:height, :width]
    return Image.fromarray(np.ascontiguousarray(arr))


def _save(im: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **options)
    return path


def _encoded(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def make_random_images(root: Path, n: int, start_seed: int = 1000, prefix: str = "rand") -> list[Path]:
    """Write ``n`` distinct colorful PNGs (`random_color_image`) into ``root``; return their paths."""
    return [_save(random_color_image(start_seed + i), root / f"{prefix}_{start_seed + i:05d}.png") for i in range(n)]


def make_image_corpus(root: Path, n_random: int = 3) -> ImageCorpus:
    """Write every kind of good and bad input image into ``root`` (small files; about 25 ms)."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = ImageCorpus(root=root)
    good = corpus.good

    # good: photos and random colors
    good.append(_save(_sample("astronaut", 80, 80), root / "astronaut.jpg", quality=90))
    good.append(_save(_sample("coffee", 96, 64), root / "coffee.png"))
    good.append(_save(_sample("chelsea", 90, 60), root / "sub" / "chelsea.webp", quality=90))
    corpus.colorful = [good[0], *make_random_images(root, n_random)]
    good.extend(corpus.colorful[1:])
    corpus.gray = _save(_sample("camera", 64, 64), root / "camera_gray.png")
    good.append(corpus.gray)
    # good: unusual but valid modes
    color = random_color_image(7, 64, 48)
    good.append(_save(color.convert("CMYK"), root / "cmyk.jpg", quality=90))
    gray16 = Image.fromarray((np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16))
    good.append(_save(gray16, root / "gray16.png"))
    good.append(_save(random_color_image(8, 64, 48).convert("P", palette=Image.Palette.ADAPTIVE), root / "pal.png"))
    rgba = random_color_image(9, 64, 48).convert("RGBA")
    rgba.putalpha(200)
    good.append(_save(rgba, root / "rgba.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    corpus.rotated = _save(random_color_image(10, 96, 64), root / "rotated.jpg", quality=90, exif=exif.tobytes())
    good.append(corpus.rotated)

    # bad
    bad = corpus.bad
    (root / "empty.jpg").write_bytes(b"")
    bad[root / "empty.jpg"] = "empty"
    jpeg = _encoded(random_color_image(11, 64, 64), "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    bad[root / "truncated.jpg"] = "truncated"
    png = _encoded(random_color_image(12, 64, 64), "PNG")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    bad[root / "truncated.png"] = "truncated"
    (root / "notes.jpg").write_text("this is not an image\n" * 10)
    bad[root / "notes.jpg"] = "not an image"
    _save(random_color_image(13, 16, 16), root / "tiny.png")
    bad[root / "tiny.png"] = "too small"
    _save(Image.new("RGB", (256, 256), (200, 30, 30)), root / "bomb.png")  # 65,536 px > max_pixels 16,384
    bad[root / "bomb.png"] = "too large"
    _save(Image.fromarray(np.full((48, 48), 0.5, dtype=np.float32)), root / "float32.tif")
    bad[root / "float32.tif"] = "not supported"
    return corpus


# --- imageio inputs (the imageio and colorize tests) --------------------------------------------------------


def photo(height: int = 96, width: int = 128) -> np.ndarray:
    """A real photo (skimage's chelsea), resized to (height, width), uint8 RGB."""
    return np.asarray(Image.fromarray(skimage.data.chelsea()).resize((width, height), Image.Resampling.BILINEAR))


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz_tag(xyz: tuple[float, float, float]) -> bytes:
    return b"XYZ " + bytes(4) + b"".join(_s15(v) for v in xyz)


def make_icc(space: str = "RGB", gamma: float = 1.0) -> bytes:
    """A minimal ICC v2 display profile: sRGB primaries (D50-adapted) or gray, and a pure-gamma tone curve.

    With ``gamma=1`` the pixel values are linear light, so converting them to sRGB visibly brightens midtones.
    """
    desc = b"test profile\x00"
    tags = {
        b"desc": b"desc" + bytes(4) + struct.pack(">I", len(desc)) + desc + bytes(4 + 4 + 2 + 1 + 67),
        b"wtpt": _xyz_tag((0.9642, 1.0, 0.8249)),
        b"cprt": b"text" + bytes(4) + b"none\x00",
    }
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    if space == "RGB":
        tags |= {
            b"rXYZ": _xyz_tag((0.4361, 0.2225, 0.0139)),
            b"gXYZ": _xyz_tag((0.3851, 0.7169, 0.0971)),
            b"bXYZ": _xyz_tag((0.1431, 0.0606, 0.7141)),
            b"rTRC": curve,
            b"gTRC": curve,
            b"bTRC": curve,
        }
    else:
        tags[b"kTRC"] = curve
    table, data = b"", b""
    offset = 128 + 4 + 12 * len(tags)
    for sig, body in tags.items():
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntr"
    header += (b"RGB " if space == "RGB" else b"GRAY") + b"XYZ " + bytes(12) + b"acsp" + bytes(24)
    header += _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + data


def read_png16(path: Path) -> np.ndarray:
    """Decode a 16-bit RGB(A) PNG whose rows all use filter type 0 (as `write_image` writes them)."""
    data = path.read_bytes()
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color_type = header[:4]
    assert depth == 16
    channels = {2: 3, 6: 4}[color_type]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels * 2)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].copy().view(">u2").reshape(height, width, channels).astype(np.uint16)


def load(path: Path) -> Image.Image:
    """Open and fully read an image file, closing it (no ResourceWarning)."""
    with Image.open(path) as im:
        im.load()
        return im


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def bad_image_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its error must contain)."""
    jpeg = io.BytesIO()
    Image.fromarray(photo()).save(jpeg, "JPEG")
    png = io.BytesIO()
    Image.fromarray(photo()).save(png, "PNG")
    files = {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "truncated"),
        "truncated.png": (png.getvalue()[: len(png.getvalue()) // 2], "truncated"),
        "text.jpg": (b"this is not an image\n", "not an image"),
        "anim.gif": (None, "unsupported format GIF"),
    }
    out = {}
    for name, (data, phrase) in files.items():
        path = tmp_path / name
        if data is None:
            Image.fromarray(photo(8, 8)).save(path)
        else:
            path.write_bytes(data)
        out[name] = (path, phrase)
    return out
