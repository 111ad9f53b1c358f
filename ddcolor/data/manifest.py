"""The shard dataset's format: file names, the manifest and its reader, the shard schema check, orphan shards.

The one owner of these rules; ingestion writes them (`ddcolor.data.ingest`), the loader, validation, dataset versions
and evaluation read them. Imports no torch (nor numpy, PIL or pyarrow at import time), so reading a dataset's version
or manifest is cheap.

Layout of a dataset at DEST (a local folder or ``s3://`` prefix)::

    manifest.json                       # the dataset: written last, atomically; lists every shard
    quarantine.json                     # rejected inputs with reasons, accumulated across runs
    shards/part-00000-<hash8>.parquet   # rows in `ddcolor.data.shards.SHARD_SCHEMA`; hash8 = file sha256[:8]

Manifest (``format_version`` 1)::

    {"format": "ddcolor-shards", "format_version": 1, "created_at": "<iso UTC>",
     "config": {"size": 256, "resize_mode": "resize", "val_fraction": 0.05, "min_colorfulness": 15.0},
     "shards": [{"path": "shards/part-00000-1a2b3c4d.parquet", "rows": 1024, "bytes": 123, "sha256": "<hex>",
                 "splits": {"train": 970, "val": 54}, "low_colorfulness": 12}],
     "counts": {"rows": 1024, "train": 970, "val": 54, "low_colorfulness": 12, "shards": 1}}

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
    "format_problem",
    "manifest_sha256",
    "manifest_uri",
    "orphan_shards",
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
