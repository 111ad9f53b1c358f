"""Shard encoding: round-trip error bounded by the quantisation steps stated in ddcolor.data.shards, and the same
bytes on every CPU (golden hashes of the Lab encoding and of whole prepared rows, the rows on each of torch's CPU
kernels, and the rounding margin over all 8-bit colors)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from ddcolor.color import rgb_to_lab
from ddcolor.data.samples import sample_images
from ddcolor.data.shards import AB_MAX, AB_MIN, _unrounded, decode_lab, encode_lab, split_for
from tests.helpers.golden_rows import prepared_rows_sha256

# sha256 of the decoded pixels of sample 0000_astronaut.jpg (512x512) and of its encoded L + ab bytes. Measured
# on an AMX machine; the float64 encoding makes the second one the same on AVX2 and AVX-512 machines.
GOLDEN_PIXELS_SHA256 = "d37dddd42572eda274e4d1c52cbee1b6a2abb061121242410d98869236e9babb"
GOLDEN_LAB_SHA256 = "ce2515ee3811313f83fccd616213f6321a3da5d9e6753226947f245a86665a10"
# sha256 of the L + ab bytes `prepare_row` makes of that sample (tests/helpers/golden_rows.py: decode, resize and Lab
# encoding together; torch's resize and, for one row, PIL's, which large images get). Pinned when the resize moved
# from PIL to torch's uint8 kernel (the same filter, 8-bit intermediate and pass order): 0.01-0.24% of the L and ab
# values of the torch rows moved by one step, where a resized value lay halfway between two 8-bit levels. The same
# on torch's DEFAULT, AVX2 and AVX-512 kernels (checked below).
GOLDEN_ROWS_SHA256 = "96afbb435d5eebb70aa5c291a5cb9a235ccfe4ea045ee5bc84827b291b40d247"
# float64 Lab differs between SIMD code paths by ~1e-13; no 8-bit color comes closer than ~5e-9 to a boundary.
MIN_ROUNDING_MARGIN = 1e-9


def test_round_trip_error_is_within_the_quantisation_step():
    rgb = data.astronaut()[::4, ::4].copy()  # (128, 128, 3) uint8
    l_bytes, ab_bytes = encode_lab(rgb)
    assert len(l_bytes) == 128 * 128 and len(ab_bytes) == 2 * 128 * 128
    lightness, ab = decode_lab(l_bytes, ab_bytes, 128, 128)
    exact = rgb_to_lab(torch.from_numpy(rgb).permute(2, 0, 1)[None].double() / 255)[0].numpy()
    assert np.abs(lightness[0] - exact[0]).max() <= 0.5 * 100 / 255 + 1e-6
    assert np.abs(ab - exact[1:]).max() <= 0.5 + 1e-6


def test_encoded_bytes_of_a_sample_image_are_pinned():
    sample = sample_images(1)[0]
    rgb = np.array(Image.open(io.BytesIO(sample.data)).convert("RGB"))
    assert hashlib.sha256(rgb.tobytes()).hexdigest() == GOLDEN_PIXELS_SHA256, (
        f"{sample.name} decodes to other pixels here (a different scikit-image, Pillow or libjpeg): the Lab hash "
        "below cannot be compared; re-pin both hashes if the new decoder is intended"
    )
    l_bytes, ab_bytes = encode_lab(rgb)
    assert hashlib.sha256(l_bytes + ab_bytes).hexdigest() == GOLDEN_LAB_SHA256


def test_prepared_rows_of_a_sample_image_are_pinned():
    assert prepared_rows_sha256() == GOLDEN_ROWS_SHA256, (
        "prepare_row makes other bytes of the sample here. If test_encoded_bytes_of_a_sample_image_are_pinned fails "
        "too, the decoder changed (re-pin all three); else the resize (torch or Pillow version: see "
        "ddcolor.data.prepare) or the Lab encoding did. Re-pin only if the change is intended and explained"
    )


@pytest.mark.slow
def test_prepared_rows_are_the_same_on_every_torch_cpu_kernel(tmp_path):
    """The resize and the float64 Lab math run on torch's kernel for this CPU (AVX-512 here, AVX2 or plain C
    elsewhere); ATEN_CPU_CAPABILITY forces each. Without a cached Lab table (an empty cache folder) the rows go
    through encode_lab itself."""
    script = (
        "import torch; from tests.helpers.golden_rows import prepared_rows_sha256; "
        "print(torch.backends.cpu.get_cpu_capability(), prepared_rows_sha256())"
    )
    ran = []
    for capability in ("default", "avx2", "avx512"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "DDCOLOR_CACHE_DIR": str(tmp_path / "cache")}
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        used, digest = done.stdout.split()[-2:]
        if used.lower() != capability:  # this CPU lacks it (torch falls back to the best it has)
            continue
        assert digest == GOLDEN_ROWS_SHA256, capability
        ran.append(capability)
    assert "default" in ran, ran
    if len(ran) == 1:
        pytest.skip("this CPU has no AVX2: only torch's plain kernel could be compared with the golden")


@pytest.mark.slow
def test_no_8bit_color_encodes_near_a_rounding_boundary():
    """Every 8-bit sRGB color (a 4096x4096 image holds all 2^24) is rounded at least MIN_ROUNDING_MARGIN away from
    x.5, so float64 error (~1e-13, different per CPU) cannot change a byte."""
    everything = np.arange(2**24, dtype=np.uint32)
    rgb = np.stack([everything >> 16, (everything >> 8) & 255, everything & 255], axis=-1).astype(np.uint8)
    rgb = rgb.reshape(4096, 4096, 3)
    worst = []
    for rows in np.array_split(rgb, 8):  # ~100 MB of float64 at a time
        values = _unrounded(rows)
        distance = np.abs(values - np.floor(values) - 0.5)
        distance[1:][(values[1:] < AB_MIN - 0.5) | (values[1:] > AB_MAX + 0.5)] = 1.0  # clamped anyway
        worst.append(distance.reshape(3, -1).min(axis=1))
    assert np.min(worst, axis=0).min() > MIN_ROUNDING_MARGIN, np.min(worst, axis=0)


def test_corrupt_row_lengths_are_reported():
    with pytest.raises(ValueError, match="expected 16 / 32 for 4x4"):
        decode_lab(b"\0" * 15, b"\0" * 32, 4, 4)
    with pytest.raises(ValueError, match="uint8"):
        encode_lab(np.zeros((4, 4, 3), dtype=np.float32))


def test_split_is_deterministic_and_close_to_the_fraction():
    import hashlib

    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    splits = [split_for(h, 0.1) for h in hashes]
    assert splits == [split_for(h, 0.1) for h in hashes]
    assert 0.08 < splits.count("val") / len(splits) < 0.12
