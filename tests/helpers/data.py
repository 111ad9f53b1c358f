"""Shard datasets in tests: read one back with every integrity check, compare two, and corrupt one on purpose."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ddcolor import storage
from ddcolor.data.ingest import load_manifest, load_quarantine
from ddcolor.data.shards import SHARD_SCHEMA


def read_dataset(dest: str) -> tuple[dict, list[dict]]:
    """The manifest and all rows, after checking every shard against its manifest entry."""
    manifest = load_manifest(dest)
    assert manifest is not None
    rows: list[dict] = []
    for entry in manifest["shards"]:
        assert entry["path"].startswith("shards/part-") and entry["path"].endswith(".parquet")
        data = storage.read_bytes(storage.join(dest, entry["path"]))
        digest = hashlib.sha256(data).hexdigest()
        assert (entry["sha256"], entry["bytes"]) == (digest, len(data))
        assert entry["path"].split("-")[-1] == f"{digest[:8]}.parquet"
        with storage.open_input_file(storage.join(dest, entry["path"])) as fh:
            pf = pq.ParquetFile(fh)
            assert pf.schema_arrow.equals(SHARD_SCHEMA)
            assert all(pf.metadata.row_group(i).num_rows <= 64 for i in range(pf.num_row_groups))
            shard = pf.read().to_pylist()
        assert entry["rows"] == len(shard)
        assert entry["splits"] == {s: sum(r["split"] == s for r in shard) for s in ("train", "val")}
        assert entry["low_colorfulness"] == sum(r["low_colorfulness"] for r in shard)
        rows.extend(shard)
    counts = manifest["counts"]
    assert counts["rows"] == len(rows) and counts["shards"] == len(manifest["shards"])
    assert counts["train"] + counts["val"] == len(rows)
    assert counts["low_colorfulness"] == sum(r["low_colorfulness"] for r in rows)
    assert len({r["sha256"] for r in rows}) == len(rows), "duplicate rows"
    return manifest, rows


def dataset_content(dest: str) -> tuple[list[dict], list[dict], list[dict]]:
    """What a dataset holds, without what differs between runs (ingest time, so shard file hashes and names)."""
    manifest, rows = read_dataset(dest)
    shards = [{k: v for k, v in s.items() if k not in ("path", "sha256", "bytes")} for s in manifest["shards"]]
    quarantine = [{k: v for k, v in e.items() if k != "quarantined_at"} for e in load_quarantine(dest)]
    return shards, [{k: v for k, v in r.items() if k != "ingested_at"} for r in rows], quarantine


def poison_a_row(shards: Path) -> None:
    """Truncate one row's L bytes and re-hash the shard in the manifest: readable, well-listed, but wrong data."""
    path = sorted((shards / "shards").glob("*.parquet"))[0]
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["L"] = rows[0]["L"][:-3]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    data = path.read_bytes()
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if path.name in s["path"])
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (shards / "manifest.json").write_text(json.dumps(manifest))
