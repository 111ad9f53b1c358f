"""Manifest and shard-file checks (plain Python; GX is awkward for files and checksums).

`_load` reads a dataset's manifest (format rules from `ddcolor.data.manifest`) and every shard it lists, returning
the file-level checks (manifest format and totals; per shard: readable, size, sha256, Parquet, schema, row / split /
low-colorfulness counts, decodable rows; unlisted files as a warning) and the per-image stats frame of every usable
shard (`ddcolor.data.validate.stats`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ddcolor import storage
from ddcolor.data.manifest import FORMAT as MANIFEST_FORMAT
from ddcolor.data.manifest import FORMAT_VERSION as MANIFEST_FORMAT_VERSION
from ddcolor.data.manifest import MANIFEST_NAME, format_problem, orphan_shards, schema_problems, shards_problem
from ddcolor.data.shards import SPLITS
from ddcolor.data.validate.result import Check, _short
from ddcolor.data.validate.stats import _empty_stats, compute_image_stats

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class _Loaded:
    manifest: dict[str, Any] | None
    stats: pd.DataFrame
    checks: list[Check]
    shards: int


def _per_shard_check(name: str, bad: Mapping[str, Any], total: int, expected: str) -> Check:
    """One check summarising a property over all shards; the failing shards are named."""
    if not bad:
        return Check(name, True, observed=f"{total}/{total} shards ok", expected=expected)
    details = "; ".join(f"{path}: {_short(why, 200)}" for path, why in bad.items())
    return Check(
        name,
        False,
        observed={"failed_shards": dict(bad)},
        expected=expected,
        details=f"{len(bad)} of {total} shards failed: {details}",
    )


def _load_manifest(uri: str, checks: list[Check]) -> dict[str, Any] | None:
    murl = storage.join(uri, MANIFEST_NAME)
    try:
        manifest = json.loads(storage.read_bytes(murl))
        if not isinstance(manifest, dict):
            raise ValueError(f"top level is {type(manifest).__name__}, expected an object")
    except Exception as err:
        checks.append(
            Check("manifest.read", False, observed=f"{type(err).__name__}: {err}", expected=f"readable JSON {murl}")
        )
        return None
    checks.append(Check("manifest.read", True, observed=murl, expected="readable JSON"))
    fmt = (manifest.get("format"), manifest.get("format_version"))
    checks.append(
        Check(
            "manifest.format",
            format_problem(manifest) is None,
            observed=list(fmt),
            expected=[MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION],
        )
    )
    shards = manifest.get("shards")
    ok = shards_problem(manifest) is None
    checks.append(
        Check(
            "manifest.shards",
            ok,
            observed=f"{len(shards)} entries" if isinstance(shards, list) else repr(shards)[:100],
            expected="a list of {path, rows, bytes, sha256, splits, low_colorfulness}",
        )
    )
    if not ok:
        manifest["shards"] = []
    paths = [s["path"] for s in manifest["shards"]]
    dups = sorted({p for p in paths if paths.count(p) > 1})
    checks.append(
        Check("manifest.shards.unique_paths", not dups, observed=dups or "unique", expected="each shard listed once")
    )
    return manifest


def _manifest_totals(manifest: dict[str, Any], checks: list[Check]) -> None:
    """Manifest ``counts`` equal the sums of its shard entries."""
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    entries = manifest["shards"]

    def total(key: str, sub: str | None = None) -> int | None:
        try:
            return sum(int(s[key][sub] if sub else s[key]) for s in entries)
        except (KeyError, TypeError, ValueError):
            return None

    sums = {
        "shards": len(entries),
        "rows": total("rows"),
        "train": total("splits", "train"),
        "val": total("splits", "val"),
        "low_colorfulness": total("low_colorfulness"),
    }
    for key, want in sums.items():
        have = counts.get(key)
        checks.append(
            Check(
                f"manifest.counts.{key}",
                want is not None and have == want,
                observed=have,
                expected=want if want is not None else "sum of shard entries (missing fields)",
                details="" if have == want else f"manifest counts.{key} = {have}, sum over shard entries = {want}",
            )
        )


def _load(uri: str, *, check_files: bool = True) -> _Loaded:
    """Read manifest and shards: file-level checks plus the per-image stats frame of every usable shard."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    checks: list[Check] = []
    manifest = _load_manifest(uri, checks)
    if manifest is None:
        return _Loaded(None, _empty_stats(), checks, 0)
    _manifest_totals(manifest, checks)

    entries = manifest["shards"]
    bad: dict[str, dict[str, Any]] = {
        k: {} for k in ("read", "bytes", "sha256", "parquet", "schema", "rows", "splits", "low_colorfulness", "decode")
    }
    frames = []
    for entry in entries:
        path = entry["path"]
        try:
            data = storage.read_bytes(storage.join(uri, path))
        except Exception as err:
            bad["read"][path] = f"{type(err).__name__}: {err}"
            continue
        if entry.get("bytes") != len(data):
            bad["bytes"][path] = {"file": len(data), "manifest": entry.get("bytes")}
        digest = hashlib.sha256(data).hexdigest()
        if entry.get("sha256") != digest:
            bad["sha256"][path] = {"file": digest, "manifest": entry.get("sha256")}
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as err:
            bad["parquet"][path] = f"{type(err).__name__}: {err}"
            continue
        problems = schema_problems(table.schema)
        if problems:
            bad["schema"][path] = "; ".join(problems)
            continue
        try:
            frame = compute_image_stats(table, source=path)
        except Exception as err:  # e.g. nulls in non-nullable columns of a hand-made file
            bad["parquet"][path] = f"cannot read rows: {type(err).__name__}: {err}"
            continue
        frames.append(frame)
        if entry.get("rows") != len(frame):
            bad["rows"][path] = {"file": len(frame), "manifest": entry.get("rows")}
        splits = {s: int((frame["split"] == s).sum()) for s in SPLITS}
        want_splits = entry.get("splits")
        if not isinstance(want_splits, dict) or {s: want_splits.get(s) for s in SPLITS} != splits:
            bad["splits"][path] = {"file": splits, "manifest": want_splits}
        low = int(frame["low_colorfulness"].fillna(False).astype(bool).sum())
        if entry.get("low_colorfulness") != low:
            bad["low_colorfulness"][path] = {"file": low, "manifest": entry.get("low_colorfulness")}
        errors = frame.loc[frame["decode_error"].notna(), ["row", "decode_error"]]
        if len(errors):
            bad["decode"][path] = (
                f"{len(errors)} rows, e.g. row {errors['row'].iloc[0]}: {errors['decode_error'].iloc[0]}"
            )

    n = len(entries)
    expectations = {
        "read": "every listed shard file can be read",
        "bytes": "file size equals manifest bytes",
        "sha256": "file sha256 equals manifest sha256",
        "parquet": "file parses as Parquet",
        "schema": "columns and Arrow types equal SHARD_SCHEMA",
        "rows": "row count equals manifest rows",
        "splits": "train/val row counts equal manifest splits",
        "low_colorfulness": "low-colorfulness row count equals manifest low_colorfulness",
        "decode": "L/ab byte lengths match height x width in every row",
    }
    for key, expected in expectations.items():
        checks.append(_per_shard_check(f"shard.{key}", bad[key], n, expected))

    if check_files:
        try:
            unlisted: list[str] | None = orphan_shards(uri, {"shards": entries})
        except storage.StorageError:
            unlisted = None  # cannot list: no verdict either way
        if unlisted is not None:
            checks.append(
                Check(
                    "shard.unlisted_files",
                    not unlisted,
                    observed=unlisted or "none",
                    expected="every .parquet file under shards/ is in the manifest",
                    details=f"not in manifest (readers ignore them; e.g. left by an interrupted ingest): {unlisted}"
                    if unlisted
                    else "",
                    severity="warning",
                )
            )
    stats = pd.concat(frames, ignore_index=True) if frames else _empty_stats()
    return _Loaded(manifest, stats, checks, n)


def load_image_stats(uri: str) -> pd.DataFrame:
    """Per-image stats of every readable, well-formed shard of the dataset at ``uri`` (no checks reported)."""
    return _load(uri, check_files=False).stats
