"""The shard dataset's format: file names, the manifest and its reader, the shard schema check, orphan shards.

The one owner of these rules; ingestion writes them (`ddcolor.data.ingest`), the loader, validation, dataset versions
and evaluation read them. Imports no torch (nor numpy, PIL or pyarrow at import time), so reading a dataset's version
or manifest is cheap.

Layout of a dataset at DEST (a local folder or ``s3://`` prefix)::

    manifest.json                       # the dataset: written last, atomically; lists every shard
    quarantine.json                     # rejected inputs with reasons, accumulated across runs
    shards/part-00000-<hash8>.parquet   # rows in `ddcolor.data.shards.SHARD_SCHEMA`; hash8 = file sha256[:8]
    hash-index/<hash16>.bin             # sorted sha256 digests of all rows (`ddcolor.data.hash_index`)

Manifest (``format_version`` 1)::

    {"format": "ddcolor-shards", "format_version": 1, "created_at": "<iso UTC>",
     "config": {"size": 256, "resize_mode": "resize", "val_fraction": 0.05, "min_colorfulness": 15.0},
     "shards": [{"path": "shards/part-00000-1a2b3c4d.parquet", "rows": 1024, "bytes": 123, "sha256": "<hex>",
                 "splits": {"train": 970, "val": 54}, "low_colorfulness": 12}],
     "counts": {"rows": 1024, "train": 970, "val": 54, "low_colorfulness": 12, "shards": 1},
     "hash_index": "hash-index/0123456789abcdef.bin"}

``hash_index`` is optional (manifests written before it existed lack it; readers rebuild it from the shards).
The shard number in a file name is the shard's position when it was written; two runs that commit at the same time
can both write a ``part-00007-…`` (their hashes differ), and the manifest's order is the dataset's order.

Commits: a run writes its shards first, then updates ``quarantine.json`` and last ``manifest.json``, each with
`ddcolor.storage.update_bytes` (S3 conditional writes / a folder lock): two runs that ingest into one dataset at
the same time never lose a shard or double a row; the later one re-reads the manifest and drops rows the other
added first.

Readers use only the shards the manifest lists: a shard left by an interrupted run is an *orphan*
(`orphan_shards`), ignored (and logged). The sha256 of the manifest's bytes (`manifest_sha256`) identifies the
dataset version: it lists every shard's sha256.

Quarantine: ``{"format": "ddcolor-quarantine", "format_version": 1, "entries": [{"source_uri", "sha256" (null if
the file could not be read), "reason", "quarantined_at"}]}``; one entry per (source_uri, sha256), dropped once that
content is ingested (e.g. after raising ``data.max_image_pixels``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ddcolor import storage
from ddcolor.errors import DDColorError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "QUARANTINE_FORMAT",
    "QUARANTINE_NAME",
    "SHARDS_DIR",
    "ManifestError",
    "QuarantineEntry",
    "build_manifest",
    "format_problem",
    "manifest_sha256",
    "manifest_uri",
    "merge_quarantine",
    "orphan_shards",
    "parse_manifest",
    "read_manifest",
    "schema_problems",
    "shards_problem",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "ddcolor-shards"
FORMAT_VERSION = 1
SHARDS_DIR = "shards"
QUARANTINE_NAME = "quarantine.json"
QUARANTINE_FORMAT = "ddcolor-quarantine"  # its format_version is FORMAT_VERSION too
CONFIG_KEYS = ("size", "resize_mode", "val_fraction", "min_colorfulness")  # data.* settings a dataset is built with


class ManifestError(DDColorError, ValueError):
    """A dataset manifest that cannot be used: missing, not JSON, another format or version, or a bad shard list.

    The message starts with the manifest's URI; ``uri`` holds it, ``missing`` is True when there is no file at all.
    """

    def __init__(self, message: str, uri: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.uri = uri
        self.missing = missing


def manifest_uri(dataset_uri: str) -> str:
    """``<dataset_uri>/manifest.json``."""
    return storage.join(str(dataset_uri), MANIFEST_NAME)


def format_problem(manifest: Any) -> str | None:
    """Why `manifest` (parsed JSON) is not a ``ddcolor-shards`` v1 manifest, or None when it is."""
    if not isinstance(manifest, dict):
        return f"top level is {type(manifest).__name__}, expected an object"
    if manifest.get("format") != FORMAT:
        return f"not a {FORMAT} manifest (format {manifest.get('format')!r})"
    if manifest.get("format_version") != FORMAT_VERSION:
        return (
            f"format_version {manifest.get('format_version')!r} is not supported (this ddcolor reads {FORMAT_VERSION})"
        )
    return None


def shards_problem(manifest: dict[str, Any]) -> str | None:
    """Why the manifest's ``shards`` is not a list of ``{"path": str, ...}`` entries, or None when it is."""
    shards = manifest.get("shards")
    if isinstance(shards, list) and all(isinstance(s, dict) and isinstance(s.get("path"), str) for s in shards):
        return None
    return "'shards' must be a list of {'path': ..., 'rows': ...}"


def read_manifest(dataset_uri: str) -> dict[str, Any]:
    """The checked manifest of the dataset at `dataset_uri` (local folder or ``s3://`` prefix).

    Raises:
        ManifestError: no manifest (``missing`` set), not JSON, another format or version, or a bad shard list;
            the message names the file.
        ddcolor.storage.StorageError: storage failures other than a missing file (e.g. S3 unreachable; retryable).
    """
    uri = manifest_uri(dataset_uri)
    try:
        data = storage.read_bytes(uri)
    except storage.StorageNotFoundError:
        raise ManifestError(
            f"{uri}: no dataset manifest here (ingest one with `ddcolor ingest SOURCE --dest DEST`)", uri, missing=True
        ) from None
    return parse_manifest(data, uri)


def parse_manifest(data: bytes, uri: str) -> dict[str, Any]:
    """The checked manifest in ``data`` (the bytes of the manifest at ``uri``, named in errors).

    Raises:
        ManifestError: not JSON, another format or version, or a bad shard list.
    """
    try:
        manifest = json.loads(data)
    except ValueError as err:
        raise ManifestError(f"{uri}: cannot read dataset manifest: not JSON ({err})", uri) from None
    problem = format_problem(manifest) or shards_problem(manifest)
    if problem:
        raise ManifestError(f"{uri}: {problem}", uri)
    return manifest


def manifest_sha256(dataset_uri: str) -> str:
    """The dataset version: sha256 (hex) of the bytes of its ``manifest.json``.

    Raises:
        ddcolor.storage.StorageNotFoundError: no manifest. ddcolor.storage.StorageError: other storage failures.
    """
    return hashlib.sha256(storage.read_bytes(manifest_uri(dataset_uri))).hexdigest()


def schema_problems(schema: pa.Schema, *, allow_extra_columns: bool = False) -> list[str]:
    """How a shard's Arrow schema differs from `ddcolor.data.shards.SHARD_SCHEMA` (empty: it matches).

    Args:
        schema: the shard file's schema.
        allow_extra_columns: do not report columns the schema has beyond SHARD_SCHEMA (the loader reads only
            the columns it knows; validation reports them).
    """
    from ddcolor.data.shards import SHARD_SCHEMA

    problems = []
    have = {f.name: f.type for f in schema}
    for f in SHARD_SCHEMA:
        if f.name not in have:
            problems.append(f"missing column {f.name!r} ({f.type})")
        elif not have[f.name].equals(f.type):
            problems.append(f"column {f.name!r} is {have[f.name]}, expected {f.type}")
    extra = [name for name in have if SHARD_SCHEMA.get_field_index(name) < 0]
    if extra and not allow_extra_columns:
        problems.append(f"unexpected columns {extra}")
    return problems


def orphan_shards(dataset_uri: str, manifest: dict[str, Any] | None) -> list[str]:
    """Parquet files under ``<dataset_uri>/shards/`` that `manifest` does not list (all of them without one), as
    manifest-style paths relative to the dataset (``shards/part-....parquet``), sorted.

    Raises:
        ddcolor.storage.StorageError: the folder cannot be listed (a missing folder is no orphans).
    """
    base = storage.join(str(dataset_uri), SHARDS_DIR)
    try:
        found = storage.list_files(base, suffixes=[".parquet"])
    except storage.StorageNotFoundError:
        return []
    listed = {entry["path"] for entry in (manifest or {}).get("shards", [])}
    relative = (f"{SHARDS_DIR}/" + uri[len(base) :].replace("\\", "/").lstrip("/") for uri in found)
    return sorted(path for path in relative if path not in listed)


def build_manifest(
    config: dict[str, Any], shards: Sequence[dict[str, Any]], hash_index: str | None = None
) -> dict[str, Any]:
    """A manifest for ``shards`` (entries as in the module docstring) built with the ``data.*`` settings ``config``
    (`CONFIG_KEYS`), with counts summed from the entries and ``created_at`` = now."""
    counts = {
        "rows": sum(s["rows"] for s in shards),
        "train": sum(s["splits"]["train"] for s in shards),
        "val": sum(s["splits"]["val"] for s in shards),
        "low_colorfulness": sum(s["low_colorfulness"] for s in shards),
        "shards": len(shards),
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {k: config[k] for k in CONFIG_KEYS},
        "shards": list(shards),
        "counts": counts,
    }
    if hash_index is not None:
        manifest["hash_index"] = hash_index
    return manifest


@dataclass(frozen=True)
class QuarantineEntry:
    """An input that was not ingested, and why. sha256: of its bytes (None: it could not be read)."""

    source_uri: str
    sha256: str | None
    reason: str


def merge_quarantine(
    current: dict[str, Any] | None, new: Sequence[QuarantineEntry], ingested: set[str], when: datetime
) -> dict[str, Any]:
    """The quarantine file after a run: ``current``'s entries minus content now ingested, plus ``new`` entries not
    already there (one per (source_uri, sha256)), stamped ``when``."""
    entries = [e for e in (current or {}).get("entries", []) if e.get("sha256") not in ingested]
    keys = {(e.get("source_uri"), e.get("sha256")) for e in entries}
    for q in new:
        if (q.source_uri, q.sha256) not in keys:
            keys.add((q.source_uri, q.sha256))
            entries.append(
                {
                    "source_uri": q.source_uri,
                    "sha256": q.sha256,
                    "reason": q.reason,
                    "quarantined_at": when.isoformat(timespec="seconds"),
                }
            )
    return {"format": QUARANTINE_FORMAT, "format_version": FORMAT_VERSION, "entries": entries}
