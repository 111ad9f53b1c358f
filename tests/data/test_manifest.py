"""The shard dataset's format owner `ddcolor.data.manifest`: reader, errors, schema check, orphans, version hash."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pyarrow as pa
import pytest

from ddcolor.data import manifest as mf
from ddcolor.data.shards import SHARD_SCHEMA


def _write(root, manifest) -> None:
    root.mkdir(parents=True, exist_ok=True)
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (root / mf.MANIFEST_NAME).write_text(text)


def _manifest(paths=("shards/part-00000-aaaaaaaa.parquet",)) -> dict:
    shards = [{"path": p, "rows": 2, "splits": {"train": 2, "val": 0}, "low_colorfulness": 0} for p in paths]
    return {"format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "shards": shards, "counts": {"rows": 2}}


def test_read_manifest_returns_the_checked_manifest(tmp_path):
    _write(tmp_path, _manifest())
    assert mf.read_manifest(str(tmp_path)) == _manifest()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ([1, 2], "top level is list"),
        ({**_manifest(), "format": "other"}, "not a ddcolor-shards manifest"),
        ({**_manifest(), "format_version": 2}, "format_version 2 is not supported"),
        ({**_manifest(), "shards": [{"rows": 1}]}, "'shards' must be a list"),
    ],
    ids=["not-json", "not-an-object", "format", "version", "shards"],
)
def test_an_unusable_manifest_is_one_error_naming_the_file(tmp_path, content, message):
    _write(tmp_path, content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(mf.ManifestError, match=message) as info:
        mf.read_manifest(str(tmp_path))
    assert str(info.value).startswith(str(tmp_path / mf.MANIFEST_NAME))
    assert info.value.uri == str(tmp_path / mf.MANIFEST_NAME) and not info.value.missing
    assert isinstance(info.value, ValueError)  # existing `except ValueError` clauses still catch it


def test_a_missing_manifest_says_so_and_how_to_make_one(tmp_path):
    with pytest.raises(mf.ManifestError, match=r"nothing/manifest\.json: no dataset manifest.*ddcolor ingest") as info:
        mf.read_manifest(str(tmp_path / "nothing"))
    assert info.value.missing


def test_manifest_sha256_is_the_dataset_version(tmp_path):
    from ddcolor.data.version import dataset_version

    _write(tmp_path, _manifest())
    expected = hashlib.sha256((tmp_path / mf.MANIFEST_NAME).read_bytes()).hexdigest()
    assert mf.manifest_sha256(str(tmp_path)) == expected == dataset_version(tmp_path).manifest_sha256


def test_schema_problems():
    assert mf.schema_problems(SHARD_SCHEMA) == []
    dropped = pa.schema([f for f in SHARD_SCHEMA if f.name != "ab"])
    assert mf.schema_problems(dropped) == [f"missing column 'ab' ({SHARD_SCHEMA.field('ab').type})"]
    retyped = SHARD_SCHEMA.set(SHARD_SCHEMA.get_field_index("ab"), pa.field("ab", pa.string()))
    assert mf.schema_problems(retyped) == [f"column 'ab' is string, expected {SHARD_SCHEMA.field('ab').type}"]
    extra = SHARD_SCHEMA.append(pa.field("note", pa.string()))
    assert mf.schema_problems(extra) == ["unexpected columns ['note']"]
    assert mf.schema_problems(extra, allow_extra_columns=True) == []


def test_orphan_shards_are_the_unlisted_parquet_files(tmp_path):
    assert mf.orphan_shards(str(tmp_path), None) == []  # no shards folder at all
    shards = tmp_path / mf.SHARDS_DIR
    shards.mkdir()
    for name in ("part-00000-aaaaaaaa.parquet", "part-00001-bbbbbbbb.parquet", "notes.txt"):
        (shards / name).write_bytes(b"x")
    manifest = _manifest()
    assert mf.orphan_shards(str(tmp_path), manifest) == ["shards/part-00001-bbbbbbbb.parquet"]
    assert mf.orphan_shards(str(tmp_path), None) == [
        "shards/part-00000-aaaaaaaa.parquet",
        "shards/part-00001-bbbbbbbb.parquet",
    ]


def test_every_reader_uses_the_one_owner():
    from ddcolor.data import ingest, loader, validate, version

    assert ingest.MANIFEST_NAME is loader.MANIFEST_NAME is validate.MANIFEST_NAME is mf.MANIFEST_NAME
    assert version.manifest_uri is mf.manifest_uri  # version.py reads the manifest through its owner's path
    assert (ingest.FORMAT, ingest.FORMAT_VERSION) == (validate.MANIFEST_FORMAT, validate.MANIFEST_FORMAT_VERSION)


def test_importing_the_format_is_cheap():
    code = "import sys, ddcolor.data.manifest; print(sorted({'torch', 'numpy', 'PIL', 'pyarrow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
