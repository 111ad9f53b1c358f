"""Dataset versions for lineage: what training and MLflow record about the shard dataset they used.

A shard dataset (see :mod:`ddcolor.data.ingest`) is identified by its ``manifest.json``, which lists every shard
with its sha256; so the manifest's own sha256 pins the whole dataset, wherever it lives (local folder, DVC-tracked
folder, ``s3://`` prefix outside DVC). When the dataset is a DVC-tracked out (``data/shards`` out of the ``ingest``
stage, or a ``dvc add``-ed folder), the DVC md5 of that out (as in ``dvc.lock``, e.g. ``"3f2a...e1.dir"``) is
recorded too: ``dvc pull`` / ``dvc checkout`` at that revision reproduce it exactly.

DVC itself is asked (``dvc.repo.Repo``: its config at every level, ``dvc.lock``, ``.dvc`` files, the cache and
``dvc status``), so a ``cache.dir`` set with ``dvc cache dir --global`` / ``--system`` / ``--local`` is honoured.
The md5 is only reported when the workspace still holds what DVC recorded (``dvc status`` of the out is clean);
else the data changed since the last ``dvc repro``/``dvc commit``, and ``dvc_md5`` is None, with a warning.
Without the ``mlops`` extra (no ``dvc``), ``dvc_md5`` is None too.

Example::

    v = dataset_version("data/shards")          # from the repository root
    mlflow.set_tags(v.as_tags())                # dataset.uri, dataset.manifest_sha256, dataset.dvc_md5, dataset.rows
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ddcolor import storage
from ddcolor.data.manifest import manifest_uri

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


def _dvc_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` that holds a ``.dvc`` folder (no dvc import: cheap)."""
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


@contextlib.contextmanager
def _open_repo(repo: Path, target: Path) -> Iterator[Any]:
    """DVC's ``Repo`` for ``repo`` when ``target`` lies inside it, else None (no DVC repository, dvc not installed).

    ``dvc`` is imported here, not at module level: it costs ~0.2 s and is in the ``mlops`` extra only.
    """
    root = _dvc_root(repo)
    if root is None or not target.is_relative_to(root):
        yield None
        return
    try:
        from dvc.exceptions import DvcException
        from dvc.repo import Repo
    except ModuleNotFoundError:
        log.warning(
            "%s is in the DVC repository %s but dvc is not installed (pip install 'ddcolor[mlops]'): "
            "recording no DVC md5",
            target,
            root,
        )
        yield None
        return
    try:
        dvc_repo = Repo(str(root))
    except DvcException as err:  # NotDvcRepoError, a broken .dvc/config, ...
        log.warning("cannot open the DVC repository %s: %s; recording no DVC md5", root, err)
        yield None
        return
    with dvc_repo:
        yield dvc_repo


def _find_out(dvc_repo: Any, target: Path) -> Any:
    """The DVC ``Output`` at ``target`` (a ``dvc.yaml`` stage out with its ``dvc.lock`` hash, or a ``.dvc`` file's
    out from ``dvc add``), or None. A broken ``dvc.yaml``/``dvc.lock`` is logged and gives None."""
    from dvc.exceptions import DvcException

    try:
        outs = list(dvc_repo.index.outs)
    except DvcException as err:
        log.warning("cannot read the DVC pipeline of %s: %s", dvc_repo.root_dir, err)
        return None
    for out in outs:
        if out.protocol == "local" and Path(out.fs_path).resolve() == target:
            return out
    return None


def dvc_out_md5(path: str | os.PathLike[str], repo: str | os.PathLike[str] = ".") -> str | None:
    """The DVC md5 recorded for the out at ``path`` (a folder or file of ``repo``), or None if it is no out.

    Asks DVC (``dvc.repo.Repo``): the outs of ``dvc.yaml`` stages with their hashes in ``dvc.lock``, and the outs
    of ``.dvc`` files (``dvc add``). None too when the stage never ran (no hash yet). Does not check the workspace.
    """
    target = _local_path(str(path)).resolve()
    with _open_repo(Path(repo).resolve(), target) as dvc_repo:
        out = _find_out(dvc_repo, target) if dvc_repo is not None else None
        return out.hash_info.value if out is not None and out.hash_info else None


def _checked_md5(uri: str, repo: Path) -> str | None:
    """The DVC md5 of the out at local ``uri`` when the workspace still holds it (DVC's own status), else None."""
    target = _local_path(uri).resolve()
    with _open_repo(repo, target) as dvc_repo:
        out = _find_out(dvc_repo, target) if dvc_repo is not None else None
        if out is None or not out.hash_info:
            return None
        from dvc.exceptions import DvcException

        md5 = out.hash_info.value
        # `dvc status` for this out: hashes the workspace (DVC's state database skips files unchanged since they
        # were last hashed, so after `dvc repro` this reads no data) and compares with dvc.lock / the .dvc file.
        try:
            changed = out.workspace_status()
            cached = not (out.use_cache and out.changed_cache())
        except DvcException as err:  # lineage is best effort: a run does not fail over it
            log.warning("cannot get the DVC status of %s: %s; recording no DVC md5", uri, err)
            return None
        if changed:
            log.warning(
                "%s differs from the DVC-tracked version %s (dvc status: %s; run `dvc repro` or `dvc commit`); "
                "recording no DVC md5",
                uri,
                md5,
                next(iter(changed.values())),
            )
            return None
        if not cached:
            # The md5 is right, but only data in the cache (then the remote) can be restored by `dvc checkout`/`pull`.
            log.warning(
                "%s matches %s in DVC but is not in the DVC cache %s: run `dvc commit %s` (then `dvc push`) so "
                "that this version can be restored",
                uri,
                md5,
                dvc_repo.cache.local.path,
                out.def_path,
            )
        return md5


def dataset_version(uri: str | os.PathLike[str], repo: str | os.PathLike[str] = ".") -> DatasetVersion:
    """The version of the shard dataset at ``uri`` (local folder or ``s3://`` prefix).

    Args:
        uri: the dataset (holds ``manifest.json``). A relative local path is taken from the current directory.
        repo: a folder of the DVC repository that may track ``uri`` (its root or below; ignored for remote URIs).

    Raises:
        StorageNotFoundError: no ``manifest.json`` at ``uri``. StorageError: S3 failures. ValueError: the manifest
            is not JSON.
    """
    uri = str(uri)
    data = storage.read_bytes(manifest_uri(uri))  # the bytes hashed below (= `manifest_sha256`)
    try:
        manifest = json.loads(data)
    except ValueError as err:
        raise ValueError(f"{manifest_uri(uri)}: not JSON ({err})") from None
    rows = int(((manifest or {}).get("counts") or {}).get("rows") or 0) if isinstance(manifest, dict) else 0
    md5 = None if storage.is_remote(uri) else _checked_md5(uri, Path(repo).resolve())
    return DatasetVersion(uri=uri, manifest_sha256=hashlib.sha256(data).hexdigest(), dvc_md5=md5, rows=rows)
