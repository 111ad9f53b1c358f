"""Dataset versions for lineage (`ddcolor.data.version`): the manifest sha256, and the DVC md5 DVC itself reports.

The DVC tests build a real repository with the `dvc` CLI under ``tmp_path`` (``dvc init --no-scm``), with DVC's
global and system config, its site cache and HOME redirected into ``tmp_path``, so that ``dvc cache dir --global``
and ``--system`` touch nothing outside the test. The pipeline-level lineage (``dvc repro`` -> ``dvc push`` -> a
clone's ``dvc pull``) is tested in ``test_dvc.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddcolor import storage
from ddcolor.config import Config
from ddcolor.data.samples import write_samples
from ddcolor.data.version import DatasetVersion, dataset_version, dvc_out_md5

ROOT = Path(__file__).resolve().parents[2]
DVC = Path(sys.executable).parent / "dvc"


def _fake_dataset(path: Path, rows: int = 3) -> bytes:
    """A manifest and one shard-sized file: what `dataset_version` reads and what DVC hashes."""
    path.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"format": "ddcolor-shards", "format_version": 1, "counts": {"rows": rows}}).encode()
    (path / "manifest.json").write_bytes(data)
    (path / "part-00000.parquet").write_bytes(b"rows")
    return data


def test_dataset_version_outside_dvc(tmp_path):
    data = _fake_dataset(tmp_path / "ds", rows=7)
    v = dataset_version(tmp_path / "ds", repo=tmp_path)
    assert v == DatasetVersion(str(tmp_path / "ds"), hashlib.sha256(data).hexdigest(), None, 7)
    assert v.as_tags()["dataset.dvc_md5"] == "" and v.as_tags()["dataset.rows"] == "7"
    with pytest.raises(storage.StorageNotFoundError):
        dataset_version(tmp_path / "missing", repo=tmp_path)


def test_dataset_version_of_an_s3_dataset(s3_env, tmp_path):
    from ddcolor.data.ingest import ingest

    write_samples(tmp_path / "raw", 3)
    uri = f"s3://{s3_env}/datasets/v1"
    cfg = Config().data.model_copy(update={"size": 64})
    report = ingest(tmp_path / "raw", uri, cfg, num_workers=0)
    assert report.ingested == 3
    v = dataset_version(uri, repo=ROOT)
    manifest = storage.read_bytes(f"{uri}/manifest.json")
    assert v == DatasetVersion(uri, hashlib.sha256(manifest).hexdigest(), None, 3)


# --- a real DVC repository ------------------------------------------------------------------------------


def _isolate_dvc(tmp: Path, monkeypatch) -> None:
    """DVC's global and system config, its site cache and HOME under ``tmp`` (this process and its children)."""
    for name, value in {
        "HOME": tmp / "home",
        "XDG_CONFIG_HOME": tmp / "home" / ".config",
        "DVC_GLOBAL_CONFIG_DIR": tmp / "dvc-global",
        "DVC_SYSTEM_CONFIG_DIR": tmp / "dvc-system",
        "DVC_SITE_CACHE_DIR": tmp / "dvc-site",
        "DVC_NO_ANALYTICS": "1",
    }.items():
        monkeypatch.setenv(name, str(value))


def _dvc(cwd: Path, *args: str) -> None:
    proc = subprocess.run([str(DVC), *args], cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def _cached(cache: Path, md5: str) -> Path:
    """Where DVC 3 keeps the object ``md5`` in the cache folder ``cache``."""
    return cache / "files" / "md5" / md5[:2] / md5[2:]


@pytest.mark.parametrize(
    ("level", "track"),
    [("--global", "stage"), ("--system", "add"), ("--local", "stage")],
    ids=["global-cache-dvc-lock", "system-cache-dvc-add", "local-cache-dvc-lock"],
)
def test_dataset_version_asks_dvc_with_its_cache_dir(tmp_path, monkeypatch, caplog, level, track):
    """The cache is outside ``.dvc/cache`` (``dvc cache dir --global/--system/--local``); the out is a stage's
    (hash in ``dvc.lock``) or ``dvc add``'s (hash in ``shards.dvc``). Its md5 is recorded while DVC's status of
    the workspace is clean, with a warning when its files are not in that cache, and not at all once any file of
    the dataset changed."""
    _isolate_dvc(tmp_path, monkeypatch)
    repo, cache = tmp_path / "repo", tmp_path / "shared-cache"
    repo.mkdir()
    _dvc(repo, "init", "--no-scm", "-q")
    _dvc(repo, "cache", "dir", level, str(cache))
    data = _fake_dataset(repo / "data" / "shards", rows=5)
    if track == "stage":
        _dvc(repo, "stage", "add", "-q", "-n", "ingest", "-o", "data/shards", "true")
        _dvc(repo, "commit", "-q", "-f", "ingest")
        md5 = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["ingest"]["outs"][0]["md5"]
    else:
        _dvc(repo, "add", "-q", "data/shards")
        md5 = yaml.safe_load((repo / "data" / "shards.dvc").read_text())["outs"][0]["md5"]
    # the setup is what it claims: DVC put the data in the configured cache, nothing in .dvc/cache
    manifest_md5 = hashlib.md5(data).hexdigest()
    assert _cached(cache, md5).is_file() and _cached(cache, manifest_md5).is_file()
    assert not (repo / ".dvc" / "cache").exists()

    monkeypatch.chdir(repo)
    caplog.set_level(logging.WARNING, logger="ddcolor.data.version")
    assert dataset_version("data/shards") == DatasetVersion("data/shards", hashlib.sha256(data).hexdigest(), md5, 5)
    assert dataset_version(repo / "data" / "shards", repo=repo / "data").dvc_md5 == md5  # any folder of the repo
    assert dvc_out_md5("data/shards") == md5 and dvc_out_md5("data") is None
    assert not caplog.records, caplog.text  # the cache was found (a missed cache.dir warns "not in the DVC cache")

    # a file is gone from the cache: the md5 is still the workspace's, with a warning that names the cache
    _cached(cache, manifest_md5).unlink()
    assert dataset_version("data/shards").dvc_md5 == md5
    assert "not in the DVC cache" in caplog.text and str(cache) in caplog.text
    caplog.clear()

    # a file of the dataset changed since DVC recorded it (a shard or the manifest): no md5, and a warning
    for name in ("part-00000.parquet", "manifest.json"):
        changed = repo / "data" / "shards" / name
        original = changed.read_bytes()
        changed.write_bytes(original + b" ")
        assert dataset_version("data/shards").dvc_md5 is None, name
        assert "differs from the DVC-tracked version" in caplog.text and "modified" in caplog.text
        caplog.clear()
        changed.write_bytes(original)
    assert dvc_out_md5("data/shards") == md5  # what DVC recorded, whatever the workspace holds


def test_dataset_version_in_a_dvc_repo_without_dvc_installed(tmp_path, monkeypatch, caplog):
    """Without the `mlops` extra: no md5, and a warning naming the extra (the manifest's sha256 is still there)."""
    data = _fake_dataset(tmp_path / "data" / "shards")
    (tmp_path / ".dvc").mkdir()
    monkeypatch.setitem(sys.modules, "dvc.repo", None)  # `from dvc.repo import Repo` raises ModuleNotFoundError
    caplog.set_level(logging.WARNING, logger="ddcolor.data.version")
    v = dataset_version(tmp_path / "data" / "shards", repo=tmp_path)
    assert (v.manifest_sha256, v.dvc_md5) == (hashlib.sha256(data).hexdigest(), None)
    assert "pip install 'ddcolor[mlops]'" in caplog.text
