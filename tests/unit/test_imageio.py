"""Tests of `ddcolor.imageio`: every input kind and format, EXIF, ICC, 16-bit, and bad files. No model needed."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import ExifTags, Image, ImageCms

from ddcolor.imageio import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    default_max_pixels,
    format_for_path,
    normalize_format,
    read_image,
    to_uint,
    write_image,
)
from tests.helpers.images import bad_image_files, load, make_icc, photo, read_png16, save

# --- formats ---------------------------------------------------------------------------------------------


def test_normalize_format_and_extensions():
    assert normalize_format("jpg") == normalize_format(".JPEG") == "JPEG"
    assert normalize_format("tif") == "TIFF"
    assert normalize_format("webp") == "WEBP"
    assert format_for_path("a/b.TIFF") == "TIFF"
    assert format_for_path("x.gif") is None
    with pytest.raises(ValueError, match="unsupported image format"):
        normalize_format("gif")


def test_default_max_pixels_comes_from_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the config field's default
    assert default_max_pixels() == DEFAULT_MAX_PIXELS
    (tmp_path / "params.yaml").write_text("data:\n  max_image_pixels: 1234\n")
    assert default_max_pixels() == 1234


# --- reading every kind -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "BMP"])
def test_read_formats(tmp_path, fmt):
    rgb = photo(40, 52)
    path = save(Image.fromarray(rgb), tmp_path / f"x.{fmt.lower()}", format=fmt)
    image = read_image(path)
    assert image.format == fmt and image.bit_depth == 8 and image.alpha is None
    assert image.rgb.shape == (40, 52, 3) and image.rgb.dtype == np.float32
    assert image.rgb.min() >= 0.0 and image.rgb.max() <= 1.0
    tolerance = 0 if fmt in ("PNG", "TIFF", "BMP") else 40  # lossy formats
    assert np.abs(to_uint(image.rgb, 8).astype(int) - rgb).max() <= tolerance


def test_read_gray_gives_three_equal_channels(tmp_path):
    gray = skimage.data.camera()[:50, :70]
    image = read_image(save(Image.fromarray(gray), tmp_path / "g.png"))
    assert image.mode == "L"
    np.testing.assert_array_equal(to_uint(image.rgb, 8), np.repeat(gray[:, :, None], 3, axis=2))


def test_read_rgba_and_la_keep_alpha_exactly(tmp_path):
    rgb = photo(30, 40)
    alpha = np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8)
    rgba = read_image(save(Image.fromarray(np.dstack([rgb, alpha])), tmp_path / "a.png"))
    np.testing.assert_array_equal(to_uint(rgba.alpha, 8), alpha)
    np.testing.assert_array_equal(to_uint(rgba.rgb, 8), rgb)
    la = read_image(save(Image.fromarray(np.dstack([rgb[:, :, 0], alpha]), "LA"), tmp_path / "la.png"))
    np.testing.assert_array_equal(to_uint(la.alpha, 8), alpha)
    np.testing.assert_array_equal(to_uint(la.rgb[:, :, 1], 8), rgb[:, :, 0])


def test_read_palette_with_and_without_transparency(tmp_path):
    pal = Image.fromarray(photo(30, 40)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    opaque = read_image(save(pal, tmp_path / "p.png"))
    assert opaque.alpha is None and opaque.mode == "P"
    np.testing.assert_array_equal(to_uint(opaque.rgb, 8), np.asarray(pal.convert("RGB")))
    transparent = read_image(save(pal, tmp_path / "pt.png", transparency=0))
    assert transparent.alpha is not None
    np.testing.assert_array_equal(transparent.alpha == 0, np.asarray(pal) == 0)


def test_read_16bit_gray_png_and_tiff(tmp_path):
    gray16 = (skimage.data.camera()[:40, :50].astype(np.uint16) * 257) + 7
    for name in ("g16.png", "g16.tif"):
        image = read_image(save(Image.fromarray(gray16), tmp_path / name))
        assert image.bit_depth == 16, name
        np.testing.assert_array_equal(to_uint(image.rgb[:, :, 0], 16), gray16)


def test_read_cmyk_jpeg(tmp_path):
    cmyk = Image.fromarray(photo(32, 48)).convert("CMYK")
    image = read_image(save(cmyk, tmp_path / "c.jpg", quality=95))
    assert image.mode == "CMYK" and image.rgb.shape == (32, 48, 3)
    expected = np.asarray(load(tmp_path / "c.jpg").convert("RGB"))
    np.testing.assert_array_equal(to_uint(image.rgb, 8), expected)


def test_read_applies_exif_orientation_and_resets_the_tag(tmp_path):
    stored = photo(24, 40)  # 40 wide, 24 high as stored
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # rotate 90° clockwise to view
    exif[ExifTags.Base.Make] = "TestCam"
    image = read_image(save(Image.fromarray(stored), tmp_path / "r.jpg", exif=exif, quality=95))
    assert image.size == (40, 24)  # upright: 40 high, 24 wide
    kept = Image.Exif()
    kept.load(image.exif)
    assert kept[ExifTags.Base.Orientation] == 1 and kept[ExifTags.Base.Make] == "TestCam"


def test_read_converts_icc_tagged_rgb_to_srgb(tmp_path):
    rgb = photo(32, 32)
    icc = make_icc("RGB", gamma=1.0)
    image = read_image(save(Image.fromarray(rgb), tmp_path / "icc.png", icc_profile=icc))
    assert image.icc_profile == icc
    expected = ImageCms.profileToProfile(
        Image.fromarray(rgb), ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB")
    )
    np.testing.assert_array_equal(to_uint(image.rgb, 8), np.asarray(expected))
    assert image.rgb.mean() > rgb.mean() / 255 + 0.1  # linear-light values get brighter in sRGB


def test_read_gray_icc_and_ignores_a_mismatched_profile(tmp_path, caplog):
    gray = skimage.data.camera()[:32, :32]
    tagged = read_image(save(Image.fromarray(gray), tmp_path / "g.png", icc_profile=make_icc("GRAY", 1.0)))
    assert tagged.rgb.mean() > gray.mean() / 255 + 0.1
    np.testing.assert_allclose(tagged.rgb[:, :, 0], tagged.rgb[:, :, 2], atol=2 / 255)
    mismatched = read_image(save(Image.fromarray(gray), tmp_path / "m.png", icc_profile=make_icc("RGB")))
    np.testing.assert_array_equal(to_uint(mismatched.rgb[:, :, 0], 8), gray)
    assert "ICC profile" in caplog.text


# --- bad files -------------------------------------------------------------------------------------------


def test_bad_files_raise_with_file_and_reason(tmp_path):
    for name, (path, phrase) in bad_image_files(tmp_path).items():
        with pytest.raises(ImageReadError) as info:
            read_image(path)
        assert info.value.path == path and phrase in info.value.reason, (name, info.value.reason)
        assert name in str(info.value)
    with pytest.raises(ImageReadError, match="cannot access"):
        read_image(tmp_path / "missing.png")


def test_pixel_limit_guards_against_decompression_bombs(tmp_path):
    path = save(Image.new("L", (100, 100)), tmp_path / "big.png")
    for limit in (9999, 1000):  # PIL warns above the limit and errors above twice the limit: both refused
        with pytest.raises(ImageReadError, match=r"big.png: too large .*10000 pixels.*max-pixels"):
            read_image(path, max_pixels=limit)
    assert read_image(path, max_pixels=10000).size == (100, 100)
    assert read_image(path, max_pixels=None).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS  # restored


# --- writing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "BMP"])
def test_write_read_round_trip(tmp_path, fmt):
    rgb = photo(33, 47).astype(np.float32) / 255
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "TestCam"
    path = write_image(tmp_path / "out" / "x.img", rgb, format=fmt, exif=exif.tobytes())
    with Image.open(path) as im:
        assert im.format == fmt and im.size == (47, 33) and im.mode == "RGB"
        if fmt != "BMP":
            assert im.getexif().get(ExifTags.Base.Make) == "TestCam"
    back = read_image(path)
    tolerance = 1 / 255 if fmt in ("PNG", "TIFF", "BMP") else 0.2
    assert np.abs(back.rgb - rgb).max() <= tolerance
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # normal permissions, not mkstemp's


def test_write_alpha_and_jpeg_drops_it(tmp_path):
    rgb = photo(20, 30).astype(np.float32) / 255
    alpha = np.random.default_rng(1).integers(0, 256, (20, 30)).astype(np.float32) / 255
    for fmt in ("PNG", "WEBP", "TIFF"):
        out = read_image(write_image(tmp_path / f"a.{fmt.lower()}", rgb, alpha))
        np.testing.assert_array_equal(to_uint(out.alpha, 8), to_uint(alpha, 8), err_msg=fmt)
    assert read_image(write_image(tmp_path / "a.jpg", rgb, alpha)).alpha is None


def test_write_16bit_png_and_tiff(tmp_path):
    import tifffile

    rgb = np.random.default_rng(2).random((9, 11, 3)).astype(np.float32)
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "TestCam"
    png = write_image(tmp_path / "x.png", rgb, bit_depth=16, exif=exif.tobytes())
    np.testing.assert_array_equal(read_png16(png), to_uint(rgb, 16))
    with Image.open(png) as im:  # a valid PNG that PIL opens (as 8-bit), EXIF included
        assert im.size == (11, 9) and im.getexif().get(ExifTags.Base.Make) == "TestCam"
    tif = write_image(tmp_path / "x.tif", rgb, alpha=rgb[:, :, 0], bit_depth=16)
    back = tifffile.imread(tif)
    assert back.dtype == np.uint16 and back.shape == (9, 11, 4)
    np.testing.assert_array_equal(back[:, :, :3], to_uint(rgb, 16))
    jpg = write_image(tmp_path / "x.jpg", rgb, bit_depth=16)  # 8-bit only format: written as 8-bit
    assert read_image(jpg).bit_depth == 8


def test_write_errors(tmp_path):
    rgb = np.zeros((4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="cannot tell the image format"):
        write_image(tmp_path / "x.unknown", rgb)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        write_image(tmp_path / "x.png", rgb[:, :, :2])
