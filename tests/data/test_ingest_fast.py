"""The fast ingestion path gives the stored values of the plain one: 8-bit decode, resize, the Lab table,
one-pass colorfulness, draft.

`ddcolor.data.prepare.prepare_row` decodes with `read_rgb8_image` (no float32 copy), resizes PIL's 4-byte pixels
in torch straight to packed 32-bit values (`prepare_pixels`), encodes Lab with `LabEncoder` (a 2^24-entry table of
`encode_lab`) and computes colorfulness with `colorfulness_packed`. Each must give the same values as the plain
path: `read_image` + `to_uint`, `prepare_image`, `encode_lab`, `colorfulness_np`. The resize itself is PIL's
antialiased bicubic up to rounding ties (`test_resize_is_pils_bicubic_up_to_rounding_ties`).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ddcolor.color import colorfulness_np
from ddcolor.data import lab_lut, prepare
from ddcolor.data.prepare import (
    PreparedRow,
    PrepareParams,
    colorfulness_packed,
    colorfulness_u8,
    prepare_image,
    prepare_pixels,
    prepare_row,
    resize_rgb8,
)
from ddcolor.data.shards import encode_lab
from ddcolor.imageio import ImageReadError, read_image, read_rgb8, to_uint
from tests.helpers.images import make_image_corpus


def test_read_rgb8_equals_read_image_rounded_and_fails_alike(tmp_path):
    corpus = make_image_corpus(tmp_path / "corpus", n_random=2)
    assert len(corpus.good) >= 5
    for path in corpus.good:  # RGB, gray, palette, alpha, 16-bit, CMYK, EXIF-rotated, ICC-tagged, ...
        expected = to_uint(read_image(path).rgb, 8)
        got = read_rgb8(path.read_bytes(), path)
        assert got.dtype == np.uint8 and np.array_equal(got, expected), path.name
    limit = corpus.max_pixels
    for path in corpus.bad:  # empty, truncated, not an image, bomb, ... (too small is ingestion's own check)
        try:
            read_image(path, limit)
            old = None
        except ImageReadError as err:
            old = err.reason
        try:
            read_rgb8(path.read_bytes(), path, limit)
            new = None
        except ImageReadError as err:
            new = err.reason
        assert new == old, path.name


def test_colorfulness_u8_equals_colorfulness_np():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in [(1, 1), (7, 5), (256, 256)]]
    images += [np.zeros((64, 64, 3), np.uint8), np.full((1024, 1024, 3), (255, 0, 255), np.uint8)]  # sums > 2^31
    for image in images:
        expected = colorfulness_np(image)
        assert colorfulness_u8(image) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        packed = lab_lut.pack_rgb(image) | np.int32(-(1 << 24))  # a pad byte of 255 must not count
        assert colorfulness_packed(packed) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_prepared_pixels_are_torchs_resize_packed_and_pils_above_the_limit(monkeypatch):
    rgb = np.random.default_rng(2).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    assert np.array_equal(lab_lut.unpack_rgb(lab_lut.pack_rgb(rgb)).reshape(50, 70, 3), rgb)
    assert np.array_equal(prepare._shared_rgbx(im)[..., :3].numpy(), rgb)  # PIL's pixels, read in place
    # 70 x 50 -> 24 x 24 directly, or the short side to 24 (34 x 24) and the central 24 columns
    expected = {"resize": resize_rgb8(rgb, 24, 24), "center_crop": resize_rgb8(rgb, 34, 24)[:, 5:29]}
    for mode, image in expected.items():
        packed = prepare_pixels(im, 24, mode)  # 4 channels from PIL's memory, vs 3 from a numpy copy
        assert packed.shape == (24 * 24,) and packed.dtype == np.dtype("<i4")
        assert np.array_equal(lab_lut.unpack_rgb(packed).reshape(24, 24, 3), image), mode
        assert np.array_equal(prepare_image(rgb, 24, mode), image), mode
    monkeypatch.setattr(prepare, "TORCH_RESIZE_MAX_BYTES", 4 * 70 * 50 - 1)  # this image is now "large"
    for mode, (size, left) in {"resize": ((24, 24), 0), "center_crop": ((34, 24), 5)}.items():
        pil = np.asarray(im.resize(size, Image.Resampling.BICUBIC))[:, left : left + 24]
        assert np.array_equal(lab_lut.unpack_rgb(prepare_pixels(im, 24, mode)).reshape(24, 24, 3), pil), mode
    with pytest.raises(ValueError, match="RGB image"):
        prepare_pixels(Image.new("L", (4, 4)), 2, "resize")


def _pil_resize(rgb: np.ndarray, width: int, height: int, float_channels: bool = False) -> np.ndarray:
    """PIL's antialiased bicubic resize of the uint8 image, or of each channel in float ("F"), as float64."""
    if not float_channels:
        return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC)).astype(np.float64)
    channels = [Image.fromarray(rgb[..., c].astype(np.float32)) for c in range(3)]
    return np.stack([np.asarray(c.resize((width, height), Image.Resampling.BICUBIC)) for c in channels], axis=-1)


def test_resize_is_pils_bicubic_up_to_rounding_ties():
    """The stored resize (torch's uint8 kernel, `resize_rgb8` / `prepare_image`) is PIL's antialiased bicubic: the
    same filter, 8-bit intermediate and pass order, so the two differ only where a value lies about halfway between
    two levels (and a flipped intermediate moves its neighbours by one more at most), and both are equally far from
    a float resize."""
    import skimage.data

    rng = np.random.default_rng(3)
    images = {
        "portrait": skimage.data.astronaut()[::2, ::3].copy(),  # 256 high x 171 wide
        "landscape": skimage.data.astronaut()[::3, ::2].copy(),  # 171 x 256
        "noise": rng.integers(0, 256, size=(120, 90, 3), dtype=np.uint8),
        "blocks": np.kron(rng.integers(0, 256, size=(6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8),  # 48 x 64
    }
    for name, rgb in images.items():
        height, width = rgb.shape[:2]
        # one axis, both (portrait -> 100 x 100: Pillow filters the columns first), up, up and down
        for out_w, out_h in [(width, 40), (40, height), (50, 40), (100, 100), (300, 300), (300, 40)]:
            ours = resize_rgb8(rgb, out_w, out_h).astype(np.float64)
            if out_w == out_h:
                assert np.array_equal(ours, prepare_image(rgb, out_w, "resize"))
            pil = _pil_resize(rgb, out_w, out_h)
            differ = np.abs(ours - pil)
            assert differ.max() <= 2 and np.mean(differ > 0) < 0.015, (name, out_w, out_h, np.mean(differ > 0))
            exact = np.clip(_pil_resize(rgb, out_w, out_h, float_channels=True), 0, 255)
            ours_err, pil_err = np.abs(ours - exact).mean(), np.abs(pil - exact).mean()
            assert abs(ours_err - pil_err) < 0.005, (name, out_w, out_h, ours_err, pil_err)


def _reference_row(data: bytes, name, params: PrepareParams) -> PreparedRow:
    """The ingestion row computed the slow, obvious way: decode, resize to (H, W, 3), encode_lab, colorfulness_np."""
    img = prepare_image(read_rgb8(data, name), params.size, params.resize_mode)
    lightness, ab = encode_lab(img)
    return PreparedRow(lightness, ab, colorfulness_np(img))


def _assert_rows_match_the_reference(paths, encoder: lab_lut.LabEncoder, monkeypatch) -> None:
    monkeypatch.setattr(prepare, "lab_encoder", lambda: encoder)
    for mode, size in [("resize", 48), ("center_crop", 40)]:
        params = PrepareParams(size=size, resize_mode=mode, max_pixels=None)
        for path in paths:
            row, expected = (
                prepare_row(path.read_bytes(), str(path), params),
                _reference_row(path.read_bytes(), path, params),
            )
            assert isinstance(row, PreparedRow), (path.name, row)
            assert (row.L, row.ab) == (expected.L, expected.ab), (path.name, mode)
            assert row.colorfulness == pytest.approx(expected.colorfulness, rel=1e-12, abs=1e-12), path.name


def test_prepare_row_without_the_table_equals_the_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("DDCOLOR_CACHE_DIR", str(tmp_path / "cache"))  # no cached table: the direct encode_lab path
    corpus = make_image_corpus(tmp_path / "corpus", n_random=2)
    encoder = lab_lut.LabEncoder(build_after=None)
    _assert_rows_match_the_reference(corpus.good, encoder, monkeypatch)
    assert encoder.table is None and encoder.encoded == 2 * len(corpus.good)  # two resize modes


@pytest.mark.slow
def test_lab_table_gives_encode_lab_bytes_and_rows_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DDCOLOR_CACHE_DIR", str(tmp_path / "cache"))
    encoder = lab_lut.LabEncoder(build_after=1)
    rng = np.random.default_rng(1)
    first = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    assert encoder(first) == encode_lab(first) and encoder.table is None  # direct until build_after images
    image = rng.integers(0, 256, size=(96, 80, 3), dtype=np.uint8)
    assert encoder(image) == encode_lab(image) and encoder.table is not None  # now by table
    every = np.arange(1 << 24, dtype=np.uint32)[::4099]  # a spread of colors over the whole cube
    colors = np.stack([every >> 16, (every >> 8) & 255, every & 255], axis=-1).astype(np.uint8)[None]
    assert encoder(colors) == encode_lab(colors)
    assert lab_lut.cache_path().is_file()
    _assert_rows_match_the_reference(make_image_corpus(tmp_path / "corpus", n_random=2).good, encoder, monkeypatch)
    cached = lab_lut.load_or_build(build=False)  # memory-mapped from the cache
    assert isinstance(cached, np.memmap) and np.array_equal(cached, encoder.table)
    cached_copy = np.array(cached)
    cached_copy[0] = [1, 2, 3, 0]  # a table from other code: rejected by the probe and rebuilt
    np.save(lab_lut.cache_path(), cached_copy)
    assert lab_lut.load_or_build(build=False) is None


def test_jpeg_draft_decodes_smaller_and_close(tmp_path):
    photo = Image.fromarray(np.asarray(Image.effect_mandelbrot((1024, 768), (-2, -1.2, 1, 1.2), 60).convert("RGB")))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=92)
    data = buf.getvalue()
    full = read_rgb8(data, "x.jpg")
    drafted = read_rgb8(data, "x.jpg", draft_side=128)
    assert full.shape == (768, 1024, 3) and drafted.shape[0] >= 128 and drafted.shape[0] < 768 // 2
    assert read_rgb8(data, "x.jpg", draft_side=512).shape == full.shape  # not 2x larger than asked: full decode
    a, b = prepare_image(full, 64, "resize").astype(int), prepare_image(drafted, 64, "resize").astype(int)
    assert np.abs(a - b).mean() < 2.0
