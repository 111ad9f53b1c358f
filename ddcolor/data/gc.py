"""``ddcolor gc``: remove what a shard dataset no longer uses: orphan shards and old hash-index files.

Orphan shards are Parquet files under ``DEST/shards/`` that ``manifest.json`` does not list: left by a run that
crashed before its commit, or replaced during a concurrent commit (readers never read them). Hash-index files
(``DEST/hash-index/*.bin``) other than the one the manifest names belong to older dataset versions. Both are removed
only once older than a grace period (default 24 h), so the shards and index of an ingest that is running right now
(uploaded, not yet committed) are never taken from under it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from datetime import datetime

from ddcolor import storage
from ddcolor.data.hash_index import HASH_INDEX_DIR
from ddcolor.data.manifest import orphan_shards

__all__ = ["GcReport", "collect_garbage"]

DEFAULT_GRACE_S = 24 * 3600


@dataclass
class GcReport:
    """Files removed (or, with dry_run, to remove), files kept because they are younger than the grace period."""

    removed: list[str] = field(default_factory=list)
    kept_young: list[str] = field(default_factory=list)
    bytes_removed: int = 0

    def summary(self, dry_run: bool = False) -> str:
        verb = "would remove" if dry_run else "removed"
        lines = [f"{verb} {len(self.removed)} files ({self.bytes_removed / 1e6:.1f} MB)"]
        lines += [f"  {uri}" for uri in self.removed]
        if self.kept_young:
            lines.append(
                f"kept {len(self.kept_young)} unlisted files younger than the grace period (a running ingest?)"
            )
        return "\n".join(lines)


def _age_and_size(uri: str) -> tuple[float, int]:
    fs, path = storage.filesystem(uri)
    info = fs.info(path)
    modified = info.get("mtime", info.get("LastModified"))
    if isinstance(modified, datetime):
        modified = modified.timestamp()
    age = time.time() - float(modified) if modified is not None else float("inf")
    return age, int(info.get("size") or 0)


def collect_garbage(dest: str, *, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False) -> GcReport:
    """Remove orphan shards and unused hash-index files of the dataset at ``dest`` older than ``grace_s`` seconds.

    Raises:
        ddcolor.data.manifest.ManifestError: an unreadable manifest (nothing is removed then).
        ddcolor.storage.StorageError: storage unreachable.
    """
    from ddcolor.data.ingest import load_manifest

    manifest = load_manifest(dest)  # read first: a damaged manifest removes nothing
    candidates = [storage.join(dest, path) for path in orphan_shards(dest, manifest)]
    with contextlib.suppress(storage.StorageNotFoundError):  # no index folder: nothing to remove there
        candidates += storage.list_files(storage.join(dest, HASH_INDEX_DIR), suffixes=[".bin"])
    report = GcReport()
    listed = {storage.join(dest, s["path"]) for s in (manifest or {}).get("shards", [])}
    if isinstance((manifest or {}).get("hash_index"), str):
        listed.add(storage.join(dest, manifest["hash_index"]))  # the index of the current version stays
        candidates = [uri for uri in candidates if uri not in listed]
    for uri in candidates:
        assert uri not in listed, uri  # never a shard the manifest lists
        age, size = _age_and_size(uri)
        if age < grace_s:
            report.kept_young.append(uri)
            continue
        if not dry_run:
            storage.delete(uri)
        report.removed.append(uri)
        report.bytes_removed += size
    return report
