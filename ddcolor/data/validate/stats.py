"""The per-image stats frame: one row per image of a shard table, its decoded Lab stats (L in [0, 100], a*/b* in
Lab units) next to the stored index columns. Rows that do not decode get NaN stats and a ``decode_error``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ddcolor.data.shards import decode_lab

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

#: Per-image stats decoded from the shards (Lab units; L in [0, 100]).
STAT_COLUMNS = (
    "L_min",
    "L_max",
    "L_mean",
    "L_std",
    "a_min",
    "a_max",
    "a_mean",
    "a_std",
    "b_min",
    "b_max",
    "b_mean",
    "b_std",
    "ab_min",
    "ab_max",
)
_INDEX_COLUMNS = ("source", "row", "sha256", "split", "height", "width", "colorfulness", "low_colorfulness")


def _row_stats(l_bytes: bytes | None, ab_bytes: bytes | None, height: int | None, width: int | None) -> list[float]:
    if l_bytes is None or ab_bytes is None or height is None or width is None or height <= 0 or width <= 0:
        raise ValueError("null L/ab/height/width")
    lightness, ab = decode_lab(l_bytes, ab_bytes, int(height), int(width))
    out = []
    for x in (lightness, ab[0], ab[1]):
        x = x.astype(np.float64)
        out += [x.min(), x.max(), x.mean(), x.std()]
    out += [min(out[4], out[8]), max(out[5], out[9])]
    return [float(v) for v in out]


def compute_image_stats(table: pa.Table, source: str = "") -> pd.DataFrame:
    """One row per image of a shard table: index columns, decoded Lab stats, and ``decode_error``.

    Rows whose bytes do not decode (wrong length for ``height x width``, nulls) get NaN stats and the reason
    in ``decode_error``; nothing raises for bad row contents.

    Args:
        table: A shard table with (at least) the columns of :data:`~ddcolor.data.shards.SHARD_SCHEMA`.
        source: Name of the shard (its relative path), stored in the ``source`` column.
    """
    import pandas as pd

    n = table.num_rows
    cols = {name: table.column(name).to_pylist() for name in ("sha256", "split", "height", "width", "L", "ab")}
    stats = np.full((n, len(STAT_COLUMNS)), np.nan)
    errors: list[str | None] = [None] * n
    for i in range(n):
        try:
            stats[i] = _row_stats(cols["L"][i], cols["ab"][i], cols["height"][i], cols["width"][i])
        except ValueError as err:
            errors[i] = str(err)
    frame = pd.DataFrame(
        {
            "source": [source] * n,
            "row": np.arange(n, dtype=np.int64),
            "sha256": cols["sha256"],
            "split": cols["split"],
            "height": pd.array(cols["height"], dtype="Int64"),
            "width": pd.array(cols["width"], dtype="Int64"),
            "colorfulness": np.asarray(table.column("colorfulness").to_pylist(), dtype=np.float64),
            "low_colorfulness": table.column("low_colorfulness").to_pylist(),
        }
    )
    for j, name in enumerate(STAT_COLUMNS):
        frame[name] = stats[:, j]
    frame["decode_error"] = errors
    return frame


def _empty_stats() -> pd.DataFrame:
    import pandas as pd

    cols = {c: [] for c in (*_INDEX_COLUMNS, *STAT_COLUMNS, "decode_error")}
    return pd.DataFrame(cols)
