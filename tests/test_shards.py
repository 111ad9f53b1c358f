"""Shard encoding: round-trip error bounded by the quantisation steps stated in ddcolor.data.shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from ddcolor.color import rgb_to_lab
from ddcolor.data.shards import decode_lab, encode_lab, split_for


def test_round_trip_error_is_within_the_quantisation_step():
    rgb = data.astronaut()[::4, ::4].copy()  # (128, 128, 3) uint8
    l_bytes, ab_bytes = encode_lab(rgb)
    assert len(l_bytes) == 128 * 128 and len(ab_bytes) == 2 * 128 * 128
    lightness, ab = decode_lab(l_bytes, ab_bytes, 128, 128)
    exact = rgb_to_lab(torch.from_numpy(rgb).permute(2, 0, 1)[None].double() / 255)[0].numpy()
    assert np.abs(lightness[0] - exact[0]).max() <= 0.5 * 100 / 255 + 1e-6
    assert np.abs(ab - exact[1:]).max() <= 0.5 + 1e-6


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
