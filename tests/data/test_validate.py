"""Dataset validation: a good dataset passes; every failure kind is caught, named, reported; drift; CLI exit codes."""

from __future__ import annotations

import copy
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddcolor.color import colorfulness_np
from ddcolor.data.shards import SHARD_SCHEMA, encode_lab, split_for
from ddcolor.data.validate import (
    REPORT_JSON,
    REPORT_MARKDOWN,
    Tolerances,
    check_image_stats,
    load_image_stats,
    validate_dataset,
    write_reports,
)
from tests.helpers.images import make_random_images

SIZE, VAL_FRACTION, MIN_CF, N, SHARD_ROWS = 32, 0.25, 15.0, 40, 10


# --- a tiny dataset writer (the test's own, independent of ingestion) ------------------------------------------
def _rgb(rng: np.random.Generator, *, dark: float = 1.0, gray: bool = False, size: int = SIZE) -> np.ndarray:
    base = np.array([200, 115, 40]) + rng.uniform(-12, 12, 3)  # saturated orange, narrow spread: stable quantiles
    img = base + rng.normal(0, 10, (size, size, 3)) + np.linspace(-25, 25, size)[:, None, None]
    if gray:
        img = img.mean(-1, keepdims=True).repeat(3, -1)
    return np.clip(img * dark, 0, 255).astype(np.uint8)


def _row(rgb: np.ndarray, *, sha: str | None = None, min_cf: float = MIN_CF) -> dict:
    sha = sha or hashlib.sha256(rgb.tobytes()).hexdigest()
    l_bytes, ab_bytes = encode_lab(rgb)
    cf = colorfulness_np(rgb)
    return {
        "sha256": sha,
        "source_uri": f"mem://{sha[:12]}.png",
        "split": split_for(sha, VAL_FRACTION),
        "height": rgb.shape[0],
        "width": rgb.shape[1],
        "L": l_bytes,
        "ab": ab_bytes,
        "colorfulness": cf,
        "low_colorfulness": cf < min_cf,
        "ingested_at": datetime(2026, 1, 1, tzinfo=UTC),
    }


def _write(root: Path, rows: list[dict], *, size: int = SIZE, shard_rows: int = SHARD_ROWS) -> Path:
    (root / "shards").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(0, len(rows), shard_rows):
        chunk = rows[i : i + shard_rows]
        rel = f"shards/part-{i // shard_rows:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(chunk, schema=SHARD_SCHEMA), root / rel)
        data = (root / rel).read_bytes()
        entries.append(
            {
                "path": rel,
                "rows": len(chunk),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "splits": {s: sum(r["split"] == s for r in chunk) for s in ("train", "val")},
                "low_colorfulness": sum(bool(r["low_colorfulness"]) for r in chunk),
            }
        )
    manifest = {
        "format": "ddcolor-shards",
        "format_version": 1,
        "created_at": "2026-01-01T00:00:00+00:00",
        "config": {"size": size, "resize_mode": "resize", "val_fraction": VAL_FRACTION, "min_colorfulness": MIN_CF},
        "shards": entries,
        "counts": {
            "rows": len(rows),
            "train": sum(e["splits"]["train"] for e in entries),
            "val": sum(e["splits"]["val"] for e in entries),
            "low_colorfulness": sum(e["low_colorfulness"] for e in entries),
            "shards": len(entries),
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def _edit_manifest(root: Path, fn) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    fn(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _failed(result) -> set[str]:
    return {c.name for c in result.failures}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [_rgb(rng) for _ in range(N)]


@pytest.fixture(scope="module")
def rows(images):
    return [_row(im) for im in images]


@pytest.fixture(scope="module")
def good(tmp_path_factory, rows):
    return _write(tmp_path_factory.mktemp("good"), rows)


@pytest.fixture(scope="module")
def good_result(good):
    return validate_dataset(str(good))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    rng = np.random.default_rng(1)  # same distribution, other images
    return _write(tmp_path_factory.mktemp("reference"), [_row(_rgb(rng)) for _ in range(N)])


# --- the good case -----------------------------------------------------------------------------------------
def test_good_dataset_passes(good_result):
    assert good_result.success, good_result.summary()
    assert good_result.rows == N and good_result.shards == N // SHARD_ROWS
    names = {c.name for c in good_result.checks}
    for expected in (
        "manifest.counts.rows",
        "shard.sha256",
        "shard.schema",
        "gx.sha256.unique",
        "gx.height.size",
        "gx.L_max.range",
        "gx.b_max.range",
        "gx.colorfulness.not_null",
        "gx.split.val_share",
        "gx.split.matches_hash",
        "gx.low_colorfulness.share",
    ):
        assert expected in names
    assert {c.source for c in good_result.checks} == {"python", "gx"}
    assert set(good_result.profile) == {"L_mean", "L_std", "a_mean", "b_mean", "colorfulness"}


# --- each failure kind, named ------------------------------------------------------------------------------
def _variant_wrong_schema(root: Path, rows):
    path = root / "shards/part-00001.parquet"
    table = pq.read_table(path)
    table = table.drop_columns(["colorfulness"]).set_column(3, "height", table["height"].cast(pa.int64()))
    pq.write_table(table, path)
    data = path.read_bytes()

    def fix(m):
        m["shards"][1].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    _edit_manifest(root, fix)


def _variant_corrupt_bytes(root: Path, rows):
    path = root / "shards/part-00002.parquet"
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]) + b"\x00garbage")


def _variant_manifest_sha(root: Path, rows):
    _edit_manifest(root, lambda m: m["shards"][3].update(sha256="0" * 64))


def _variant_manifest_counts(root: Path, rows):
    def fix(m):
        m["counts"]["rows"] += 1
        m["shards"][0]["splits"]["train"] += 1
        m["counts"]["train"] += 1  # internally consistent, but shard 0 does not hold that many

    _edit_manifest(root, fix)


def _variant_corrupt_row(root: Path, rows):
    path = root / "shards/part-00000.parquet"
    table = pq.read_table(path).to_pylist()
    table[4]["L"] = table[4]["L"][:-3]
    pq.write_table(pa.Table.from_pylist(table, schema=SHARD_SCHEMA), path)
    data = path.read_bytes()
    _edit_manifest(root, lambda m: m["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))


def _variant_unlisted(root: Path, rows):
    (root / "shards/part-99999.parquet").write_bytes((root / "shards/part-00000.parquet").read_bytes())


FILE_VARIANTS = {
    "wrong_schema": (
        _variant_wrong_schema,
        {"shard.schema"},
        ("shard.schema", "part-00001.parquet: column 'height' is int64, expected int32; missing column 'colorfulness'"),
    ),
    "corrupt_bytes": (
        _variant_corrupt_bytes,
        {"shard.bytes", "shard.sha256", "shard.parquet"},
        ("shard.parquet", "part-00002.parquet"),
    ),
    "manifest_sha256": (_variant_manifest_sha, {"shard.sha256"}, ("shard.sha256", "part-00003.parquet")),
    "manifest_counts": (
        _variant_manifest_counts,
        {"manifest.counts.rows", "shard.splits"},
        ("shard.splits", "part-00000.parquet"),
    ),
    "corrupt_row": (
        _variant_corrupt_row,
        {"shard.decode", *(f"gx.{c}.not_null" for c in ("L_min", "L_max", "L_mean", "L_std"))},
        ("shard.decode", "part-00000.parquet: 1 rows, e.g. row 4"),
    ),
}


@pytest.mark.parametrize("kind", list(FILE_VARIANTS))
def test_file_level_failures_are_named(kind, rows, tmp_path):
    mutate, expected_failures, (check_name, named) = FILE_VARIANTS[kind]
    root = _write(tmp_path, rows)
    mutate(root, rows)
    result = validate_dataset(str(root))
    assert not result.success
    failed = _failed(result)
    if kind == "corrupt_row":  # the a/b/ab stats of that row are NaN too
        failed -= {f"gx.{c}.not_null" for c in ("a_min", "a_max", "a_mean", "a_std", "b_min", "b_max")}
        failed -= {f"gx.{c}.not_null" for c in ("b_mean", "b_std", "ab_min", "ab_max")}
    assert failed == expected_failures, result.summary()
    assert named in result.check(check_name).details
    if kind in ("wrong_schema", "corrupt_bytes"):  # the broken shard's rows are left out, the rest validated
        assert result.rows == N - SHARD_ROWS


def test_unlisted_shard_file_is_a_warning(rows, tmp_path):
    root = _write(tmp_path, rows)
    _variant_unlisted(root, rows)
    result = validate_dataset(str(root))
    assert result.success, result.summary()  # ingest leaves such files after an interrupted run; readers ignore them
    assert [c.name for c in result.warnings] == ["shard.unlisted_files"]
    assert "shards/part-99999.parquet" in result.check("shard.unlisted_files").details
    assert "WARN shard.unlisted_files" in result.summary()


def _rows_ab_out_of_range(rows):
    bad = copy.deepcopy(rows)
    bad[13]["ab"] = bytes([127]) * (2 * SIZE * SIZE)  # int8 127 is a valid byte but outside the sRGB gamut
    return bad


def _rows_duplicate_sha(rows):
    bad = copy.deepcopy(rows)
    bad[25]["sha256"] = bad[5]["sha256"]
    bad[25]["split"] = bad[5]["split"]
    return bad


def _rows_size_mismatch(rows):
    bad = copy.deepcopy(rows)
    bad[31] = _row(_rgb(np.random.default_rng(9), size=16))
    return bad


def _rows_split_off(rows):
    bad = []
    for r in copy.deepcopy(rows):  # hashes that all fall in val: consistent with split_for, but 100% val
        r["sha256"] = "00" + r["sha256"][2:]
        r["split"] = split_for(r["sha256"], VAL_FRACTION)
        bad.append(r)
    return bad


def _rows_low_colorfulness(rows):
    rng = np.random.default_rng(3)
    return [_row(_rgb(rng, gray=i % 2 == 0)) for i in range(N)]


def _rows_bad_flag(rows):
    bad = copy.deepcopy(rows)
    bad[7]["low_colorfulness"] = True  # colorful image flagged low
    return bad


ROW_VARIANTS = {
    "ab_out_of_range": (_rows_ab_out_of_range, {"gx.a_max.range", "gx.b_max.range"}, "part-00001.parquet#3"),
    "duplicate_sha256": (_rows_duplicate_sha, {"gx.sha256.unique"}, "part-00002.parquet#5"),
    "size_mismatch": (_rows_size_mismatch, {"gx.height.size", "gx.width.size"}, "part-00003.parquet#1"),
    "split_off": (_rows_split_off, {"gx.split.val_share"}, ""),
    "low_colorfulness": (_rows_low_colorfulness, {"gx.low_colorfulness.share"}, ""),
    "low_flag": (_rows_bad_flag, {"gx.low_colorfulness.flag"}, "part-00000.parquet#7"),
}


@pytest.mark.parametrize("kind", list(ROW_VARIANTS))
def test_row_level_failures_are_named(kind, rows, tmp_path):
    make, expected_failures, named = ROW_VARIANTS[kind]
    result = validate_dataset(str(_write(tmp_path, make(rows))))
    failed = _failed(result)
    assert failed == expected_failures, result.summary()
    check = result.check(sorted(expected_failures)[0])
    assert named in check.details, check
    assert check.source == "gx"


def test_out_of_range_stats_and_nan_are_caught(good, good_result):
    stats = load_image_stats(str(good))
    stats.loc[3, "L_max"] = 101.0
    stats.loc[4, "L_min"] = -0.5
    stats.loc[5, "colorfulness"] = np.nan
    checks = check_image_stats(stats, size=SIZE, val_fraction=VAL_FRACTION, min_colorfulness=MIN_CF)
    failed = {c.name for c in checks if not c.passed}
    assert {"gx.L_max.range", "gx.L_min.range", "gx.colorfulness.not_null"} <= failed
    by_name = {c.name: c for c in checks}
    assert "1 of 40 rows" in by_name["gx.L_max.range"].observed
    assert "part-00000.parquet#3" in by_name["gx.L_max.range"].details


def test_missing_manifest_and_config_mismatch_fail_without_crashing(good, tmp_path):
    result = validate_dataset(str(tmp_path / "nowhere"))
    assert not result.success and "manifest.read" in _failed(result)
    result = validate_dataset(str(good), expected={"size": 64, "val_fraction": VAL_FRACTION})
    assert "manifest.config.matches" in _failed(result)
    assert {"gx.height.size", "gx.width.size"} <= _failed(result)  # the data is checked against the params


# --- drift -------------------------------------------------------------------------------------------------
def test_drift_same_distribution_passes(good, reference):
    result = validate_dataset(str(good), reference=str(reference))
    drift = [c for c in result.checks if c.name.startswith("drift.")]
    assert {c.name for c in drift} >= {"drift.reference", "drift.L_mean.quantiles", "drift.colorfulness.quantiles"}
    assert result.success, result.summary()


def test_drift_darkened_dataset_fails(images, reference, tmp_path):
    rng = np.random.default_rng(5)
    dark = _write(tmp_path, [_row(_rgb(rng, dark=0.6)) for _ in range(N)])
    result = validate_dataset(str(dark), reference=str(reference))
    assert "drift.L_mean.quantiles" in _failed(result), result.summary()
    assert "not in" in result.check("drift.L_mean.quantiles").details
    assert not result.success
    tolerant = validate_dataset(str(dark), reference=str(reference), tolerances=Tolerances(drift_abs={"L_mean": 1e3}))
    assert "drift.L_mean.quantiles" not in _failed(tolerant)


def test_unreadable_reference_is_a_failed_check(good, tmp_path):
    result = validate_dataset(str(good), reference=str(tmp_path / "missing"))
    assert "drift.reference" in _failed(result)


# --- reports and CLI ---------------------------------------------------------------------------------------
def test_reports_written_next_to_the_data(rows, tmp_path):
    root = _write(tmp_path, rows)
    _variant_manifest_sha(root, rows)
    result = validate_dataset(str(root), write_report=True)
    md = (root / REPORT_MARKDOWN).read_text()
    assert md.startswith("# Data validation: FAILED") and "shard.sha256" in md and "part-00003.parquet" in md
    payload = json.loads((root / REPORT_JSON).read_text())
    assert payload["success"] is False and payload["rows"] == N
    assert {"name", "passed", "observed", "expected"} <= set(payload["checks"][0])
    assert [c["name"] for c in payload["checks"] if not c["passed"]] == ["shard.sha256"]
    assert result.report_uris == [str(root / REPORT_MARKDOWN), str(root / REPORT_JSON)]
    other = tmp_path / "elsewhere"
    assert write_reports(result, str(other))[0] == str(other / REPORT_MARKDOWN)


def test_cli_exit_codes(rows, tmp_path):
    from typer.testing import CliRunner

    from ddcolor.cli import app

    good = _write(tmp_path / "good", rows)
    bad = _write(tmp_path / "bad", rows)
    _variant_corrupt_bytes(bad, rows)
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(good)])
    assert ok.exit_code == 0, ok.output
    assert "validation PASSED" in ok.output and (good / REPORT_MARKDOWN).exists()
    fail = runner.invoke(app, ["validate", str(bad), "--no-report"])
    assert fail.exit_code == 1, fail.output
    assert "FAIL shard.parquet" in fail.output and "part-00002.parquet" in fail.output
    as_json = runner.invoke(app, ["validate", str(bad), "--no-report", "--json"])  # for CI: stdout is one document
    assert as_json.exit_code == 1 and "FAIL shard.parquet" in as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["success"] is False and doc["checks_failed"] >= 1 and doc["reports"] == []
    assert not (bad / REPORT_MARKDOWN).exists()
    (tmp_path / "params.yaml").write_text("data:\n  size: 64\n")
    stale = runner.invoke(app, ["validate", str(good), "--config", str(tmp_path / "params.yaml"), "--no-report"])
    assert stale.exit_code == 1 and "manifest.config.matches" in stale.output
    usage = runner.invoke(app, ["validate", str(good), "--drift-tol", "L_avg=3"])
    assert usage.exit_code == 2 and "--drift-tol" in usage.output and "validate.drift_abs" in usage.output


def test_tolerances_come_from_the_validate_section_and_flags_override_it(tmp_path, monkeypatch):
    """A collection that is one third black-and-white fails the default low-colorfulness share (0.2); the validate
    section of params.yaml (or --max-low-share) lets it through without editing code; a bad value names the key."""
    from typer.testing import CliRunner

    from ddcolor.cli import app
    from ddcolor.config import ValidateConfig, load_config

    assert Tolerances() == Tolerances.from_config(ValidateConfig())  # one source of defaults
    rng = np.random.default_rng(3)
    data = _write(tmp_path / "bw", [_row(_rgb(rng, gray=i % 3 == 0)) for i in range(30)])
    monkeypatch.chdir(tmp_path)  # no ./params.yaml: built-in defaults
    runner = CliRunner()
    strict = runner.invoke(app, ["validate", str(data), "--no-report"])
    assert strict.exit_code == 1 and "FAIL gx.low_colorfulness.share" in strict.output, strict.output
    params = tmp_path / "params.yaml"
    params.write_text(
        f"data:\n  size: {SIZE}\n  val_fraction: {VAL_FRACTION}\nvalidate:\n  max_low_colorfulness_share: 0.4\n"
    )
    lenient = runner.invoke(app, ["validate", str(data), "--no-report"])  # ./params.yaml now exists
    assert lenient.exit_code == 0, lenient.output
    assert load_config(params).validate.max_low_colorfulness_share == 0.4
    flag = runner.invoke(app, ["validate", str(data), "--no-report", "--config", str(params), "--max-low-share", "0.1"])
    assert flag.exit_code == 1 and "FAIL gx.low_colorfulness.share" in flag.output
    params.write_text("validate:\n  max_low_colorfulness_share: 1.5\n")
    bad = runner.invoke(app, ["validate", str(data), "--no-report"])
    assert bad.exit_code == 2 and "validate.max_low_colorfulness_share" in bad.output


# --- integration: what ingest writes validates, on local disk and on S3 ---------------------------------------
def test_ingested_dataset_passes(tmp_path):

    from ddcolor.config import DataConfig
    from ddcolor.data.ingest import ingest

    cfg = DataConfig(size=32, val_fraction=0.25, shard_rows=4, num_workers=0)
    make_random_images(tmp_path / "raw", 10)
    report = ingest(tmp_path / "raw", tmp_path / "ds", cfg, num_workers=0)
    assert report.ingested == 10
    result = validate_dataset(str(tmp_path / "ds"), expected=cfg)
    assert result.success, result.summary()
    assert result.rows == 10 and result.shards == 3


def test_s3_dataset_and_reports(rows, tmp_path, s3_env):
    from ddcolor import storage

    local = _write(tmp_path, rows[:20])
    uri = f"s3://{s3_env}/datasets/v1"
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(uri, path.relative_to(local).as_posix()), path.read_bytes())
    storage.write_bytes(storage.join(uri, "shards/part-00001.parquet"), b"corrupt")
    result = validate_dataset(uri, write_report=True)
    assert _failed(result) == {"shard.bytes", "shard.sha256", "shard.parquet"}, result.summary()
    assert "shards/part-00001.parquet" in result.check("shard.parquet").details
    assert json.loads(storage.read_bytes(f"{uri}/{REPORT_JSON}"))["success"] is False
    assert storage.read_bytes(f"{uri}/{REPORT_MARKDOWN}").startswith(b"# Data validation: FAILED")
