"""Dataset versions for lineage: what training and MLflow record about the shard dataset they used.

A shard dataset (see :mod:`ddcolor.data.ingest`) is identified by its ``manifest.json``, which lists every shard
with its sha256; so the manifest's own sha256 pins the whole dataset, wherever it lives (local folder, DVC-tracked
folder, ``s3://`` prefix outside DVC). When the dataset is the DVC-tracked ``data/shards`` out of the ``ingest``
stage, the DVC md5 of that out (from ``dvc.lock``, e.g. ``"3f2a...e1.dir"``) is recorded too: ``dvc pull`` /
``dvc checkout`` at that revision reproduce it exactly.

The DVC md5 is only reported when the workspace still holds what ``dvc.lock`` describes: when the DVC cache has
the out's ``.dir`` listing, the md5 of the workspace ``manifest.json`` must equal the one listed there (else the
data changed since the last ``dvc repro``/``dvc commit``, and ``dvc_md5`` is None, with a warning).

Example::

    v = dataset_version("data/shards")          # from the repository root
    mlflow.set_tags(v.as_tags())                # dataset.uri, dataset.manifest_sha256, dataset.dvc_md5, dataset.rows
"""

from __future__ import annotations

import configparser
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ddcolor import storage
from ddcolor.data.manifest import MANIFEST_NAME, manifest_uri

__all__ = ["DatasetVersion", "dataset_version", "dvc_out_md5"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetVersion:
    """The version of a shard dataset.

    Attributes:
        uri: the dataset as given (local folder or ``s3://`` prefix).
        manifest_sha256: sha256 of its ``manifest.json`` bytes (always set).
        dvc_md5: the DVC md5 of the out that holds the dataset, as in ``dvc.lock`` (``"<md5>.dir"``), or None when
            the dataset is not a DVC-tracked out of ``repo`` (e.g. on S3) or has changed since ``dvc.lock``.
        rows: images in the dataset (the manifest's ``counts.rows``).
    """

    uri: str
    manifest_sha256: str
    dvc_md5: str | None
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_tags(self, prefix: str = "dataset.") -> dict[str, str]:
        """String tags/params for MLflow (``dvc_md5`` is ``""`` when None)."""
        return {f"{prefix}{k}": "" if v is None else str(v) for k, v in self.to_dict().items()}


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def _lock_outs(repo: Path) -> list[tuple[Path, str]]:
    """(absolute path, md5) of every out in ``repo/dvc.lock``."""
    import yaml

    lock = repo / "dvc.lock"
    if not lock.is_file():
        return []
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        log.warning("cannot read %s: %s", lock, err)
        return []
    outs = []
    for stage in (data.get("stages") or {}).values():
        wdir = repo / (stage.get("wdir") or ".") if isinstance(stage, dict) else repo
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, dict) and out.get("path") and out.get("md5"):
                outs.append(((wdir / out["path"]).resolve(), str(out["md5"])))
    return outs


def _dvc_file_out(path: Path) -> tuple[Path, str] | None:
    """The out of ``<path>.dvc`` (``dvc add`` tracking) when there is one."""
    import yaml

    dvc_file = path.with_name(path.name + ".dvc")
    if not dvc_file.is_file():
        return None
    try:
        data = yaml.safe_load(dvc_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    for out in data.get("outs") or []:
        if isinstance(out, dict) and out.get("md5") and (dvc_file.parent / out.get("path", "")).resolve() == path:
            return path, str(out["md5"])
    return None


def _cache_dir(repo: Path) -> Path:
    """The DVC cache folder: ``cache.dir`` of ``.dvc/config.local`` or ``.dvc/config``, else ``.dvc/cache``."""
    dot_dvc = repo / ".dvc"
    for name in ("config.local", "config"):
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read(dot_dvc / name)
        except configparser.Error:
            continue
        value = parser.get("cache", "dir", fallback=None)
        if value:
            return (dot_dvc / value.strip().strip("'\"")).resolve()
    return dot_dvc / "cache"


def _listed_md5(repo: Path, dir_md5: str, relpath: str) -> str | bool | None:
    """md5 of ``relpath`` in the cached ``.dir`` listing of ``dir_md5``; False when that listing is not cached."""
    if not dir_md5.endswith(".dir"):
        return False
    name = dir_md5[: -len(".dir")]
    cache = _cache_dir(repo)
    for listing in (cache / "files" / "md5" / name[:2] / f"{name[2:]}.dir", cache / name[:2] / f"{name[2:]}.dir"):
        if listing.is_file():
            try:
                entries = json.loads(listing.read_text())
            except (OSError, ValueError):
                return False
            for entry in entries:
                if entry.get("relpath") == relpath:
                    return entry.get("md5")
            return None
    return False


def dvc_out_md5(path: str | os.PathLike[str], repo: str | os.PathLike[str] = ".") -> str | None:
    """The DVC md5 recorded for the out at ``path`` (a folder or file of ``repo``), or None if it is no out.

    Looks at ``repo/dvc.lock`` (pipeline outs) and ``<path>.dvc`` (``dvc add``). Does not check the workspace.
    """
    target = _local_path(str(path)).resolve()
    for out_path, md5 in _lock_outs(Path(repo).resolve()):
        if out_path == target:
            return md5
    found = _dvc_file_out(target)
    return found[1] if found else None


def dataset_version(uri: str | os.PathLike[str], repo: str | os.PathLike[str] = ".") -> DatasetVersion:
    """The version of the shard dataset at ``uri`` (local folder or ``s3://`` prefix).

    Args:
        uri: the dataset (holds ``manifest.json``). A relative local path is taken from the current directory.
        repo: the DVC repository whose ``dvc.lock`` may track ``uri`` (ignored for ``s3://`` URIs).

    Raises:
        StorageNotFoundError: no ``manifest.json`` at ``uri``. StorageError: S3 failures. ValueError: the manifest
            is not JSON.
    """
    uri = str(uri)
    data = storage.read_bytes(manifest_uri(uri))  # the bytes: hashed below (= `manifest_sha256`) and md5-compared
    try:
        manifest = json.loads(data)
    except ValueError as err:
        raise ValueError(f"{manifest_uri(uri)}: not JSON ({err})") from None
    rows = int(((manifest or {}).get("counts") or {}).get("rows") or 0) if isinstance(manifest, dict) else 0
    md5 = None
    if not storage.is_s3(uri):
        repo_path = Path(repo).resolve()
        md5 = dvc_out_md5(uri, repo_path)
        if md5 is not None:
            listed = _listed_md5(repo_path, md5, MANIFEST_NAME)
            workspace = hashlib.md5(data).hexdigest()
            if listed is not False and listed != workspace:
                log.warning(
                    "%s differs from the DVC-tracked version %s in dvc.lock (run `dvc repro` or `dvc commit`); "
                    "recording no DVC md5",
                    uri,
                    md5,
                )
                md5 = None
    return DatasetVersion(uri=uri, manifest_sha256=hashlib.sha256(data).hexdigest(), dvc_md5=md5, rows=rows)
