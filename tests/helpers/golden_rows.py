"""The shard rows a golden hash pins: `prepared_rows_sha256` (also run in subprocesses, one per torch CPU kernel).

python -c "from tests.helpers.golden_rows import prepared_rows_sha256; print(prepared_rows_sha256())"
"""

from __future__ import annotations

import hashlib
import io
from unittest import mock

import numpy as np
from PIL import Image

from ddcolor.data import prepare
from ddcolor.data.prepare import PreparedRow, PrepareParams, prepare_row
from ddcolor.data.samples import sample_images


def prepared_rows_sha256() -> str:
    """sha256 of the L + ab bytes `prepare_row` makes of the built-in sample 0 (a 512 x 512 JPEG: ``resize`` to 256,
    ``center_crop`` to 200) and of a 320 x 512 portrait cut from its pixels (a PNG: lossless, so its pixels are the
    JPEG's; Pillow's pass order filters its columns first), that one also as a large image (resized by PIL: see
    `ddcolor.data.prepare.TORCH_RESIZE_MAX_BYTES`). Decode, resize and Lab encoding together."""
    sample = sample_images(1)[0]
    portrait = np.array(Image.open(io.BytesIO(sample.data)).convert("RGB"))[:, 96:416]
    buffer = io.BytesIO()
    Image.fromarray(portrait).save(buffer, "PNG")
    cases = [
        (sample.data, sample.name, 256, "resize", prepare.TORCH_RESIZE_MAX_BYTES),
        (sample.data, sample.name, 200, "center_crop", prepare.TORCH_RESIZE_MAX_BYTES),
        (buffer.getvalue(), "portrait.png", 256, "resize", prepare.TORCH_RESIZE_MAX_BYTES),
        (buffer.getvalue(), "portrait.png", 256, "resize", 0),  # as if it were large: PIL's resize
    ]
    digest = hashlib.sha256()
    for data, name, size, mode, torch_max_bytes in cases:
        with mock.patch.object(prepare, "TORCH_RESIZE_MAX_BYTES", torch_max_bytes):
            row = prepare_row(data, name, PrepareParams(size=size, resize_mode=mode, max_pixels=None))
        assert isinstance(row, PreparedRow), (name, row)
        digest.update(row.L + row.ab)
    return digest.hexdigest()
