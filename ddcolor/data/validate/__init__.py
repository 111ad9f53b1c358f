"""Validate a Lab Parquet shard dataset: manifest integrity, a Great Expectations suite over per-image stats, drift.

A dataset at ``URI`` (local folder or ``s3://``) is ``manifest.json`` plus the shard files it lists (see
:mod:`ddcolor.data.shards`). :func:`validate_dataset` runs three groups of checks and returns one
:class:`ValidationResult` with every check (name, observed, expected, passed):

* **Manifest and shard files** (plain Python; GX is awkward for files and checksums): the manifest parses and
  has the right format, its totals equal the sum of its shard entries, and for every listed shard the file
  can be read, its size and sha256 equal the manifest's, it parses as Parquet, its schema equals
  :data:`~ddcolor.data.shards.SHARD_SCHEMA` (names and Arrow types), its row / split / low-colorfulness
  counts equal the manifest's and every row's ``L``/``ab`` byte lengths match ``height x width``. A
  ``.parquet`` file under ``shards/`` missing from the manifest is only a warning (an interrupted ingest leaves
  one; readers ignore it): warnings are reported but do not fail the validation. A shard that cannot be read or parsed,
  or has the wrong schema, is a failed check naming it (its rows are left out of the stats), never a crash.
* **Great Expectations suite** over a pandas frame of per-image stats decoded from the shards (one row per
  image: ``L_min/L_max/L_mean/L_std``, ``a_*``, ``b_*``, ``ab_min/ab_max``, stored ``colorfulness``, ...):
  sha256 unique and not null, no NaN stats or colorfulness, ``height == width == size``, L in [0, 100],
  a/b inside the sRGB gamut (a corrupt ``ab`` buffer shows up here, since any int8 passes the storage
  range), split values valid and equal to :func:`~ddcolor.data.shards.split_for` of the hash, the
  ``low_colorfulness`` flag agreeing with ``colorfulness < min_colorfulness``, the val share within
  tolerance of ``val_fraction`` and the low-colorfulness share below a maximum.
* **Drift** (only with a reference dataset): quantiles (default 0.1/0.5/0.9) of per-image ``L_mean``,
  ``L_std``, ``a_mean``, ``b_mean`` and ``colorfulness`` must lie within an absolute tolerance of the
  reference's (GX ``expect_column_quantile_values_to_be_between``, ranges from the reference quantiles).

Expected size / val_fraction / min_colorfulness come from the manifest's ``config``; pass ``expected`` (e.g.
``load_config().data``) to also require that the manifest was built with the current parameters.
Tolerances are :class:`Tolerances`, built from the ``validate:`` section of params.yaml
(`Tolerances.from_config`; `ddcolor.config.ValidateConfig` holds the defaults).

Modules: `result` (`Tolerances`, `Check`, `ValidationResult` and its Markdown), `integrity` (manifest and shard
files), `stats` (the per-image stats frame), `expectations` (the GX suite and drift); this one runs them in order and
writes the reports. Import the public names from here.

Reports: :func:`write_reports` saves ``validation_report.md`` (human) and ``validation.json`` (machine) next
to the data. Great Expectations is imported lazily (several seconds) with analytics off.

Example::

    result = validate_dataset("s3://bucket/shards/v3", reference="s3://bucket/shards/v2")
    print(result.summary())
    write_reports(result)          # -> s3://bucket/shards/v3/validation_report.md, validation.json
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ddcolor import storage
from ddcolor.data.validate.expectations import DRIFT_COLUMNS, check_image_stats, drift_ranges
from ddcolor.data.validate.integrity import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, _load, load_image_stats
from ddcolor.data.validate.integrity import MANIFEST_NAME as MANIFEST_NAME  # the reader's names, from data.manifest
from ddcolor.data.validate.result import (
    DEFAULT_AB_RANGE,
    DEFAULT_DRIFT_QUANTILES,
    DEFAULT_DRIFT_TOLERANCES,
    Check,
    Tolerances,
    ValidationResult,
)
from ddcolor.data.validate.stats import STAT_COLUMNS, compute_image_stats

if TYPE_CHECKING:
    import pandas as pd


__all__ = [
    "DEFAULT_AB_RANGE",
    "DEFAULT_DRIFT_QUANTILES",
    "DEFAULT_DRIFT_TOLERANCES",
    "DRIFT_COLUMNS",
    "MANIFEST_FORMAT",
    "MANIFEST_FORMAT_VERSION",
    "REPORT_JSON",
    "REPORT_MARKDOWN",
    "STAT_COLUMNS",
    "Check",
    "Tolerances",
    "ValidationResult",
    "check_image_stats",
    "compute_image_stats",
    "drift_ranges",
    "load_image_stats",
    "validate_dataset",
    "write_reports",
]

REPORT_MARKDOWN = "validation_report.md"
REPORT_JSON = "validation.json"


def _config_of(expected: Any) -> dict[str, Any]:
    if expected is None:
        return {}
    if hasattr(expected, "model_dump"):
        expected = expected.model_dump()
    return {k: expected[k] for k in ("size", "resize_mode", "val_fraction", "min_colorfulness") if k in expected}


def _profile(stats: pd.DataFrame, quantiles: Sequence[float]) -> dict[str, dict[str, float]]:
    out = {}
    for col in DRIFT_COLUMNS:
        values = stats[col].dropna().astype(float) if col in stats else None
        if values is None or values.empty:
            continue
        qv = values.quantile(list(quantiles), interpolation="linear").tolist()
        out[col] = {f"q{q:g}": float(v) for q, v in zip(quantiles, qv, strict=True)}
        out[col]["mean"] = float(values.mean())
    return out


def validate_dataset(
    uri: str,
    *,
    reference: str | None = None,
    expected: Any = None,
    tolerances: Tolerances | None = None,
    write_report: bool = False,
) -> ValidationResult:
    """Validate the shard dataset at ``uri``; never raises for bad data (every problem is a failed check).

    Args:
        uri: Dataset folder or ``s3://`` prefix holding ``manifest.json``.
        reference: Another dataset version to compare per-image stat quantiles against (drift checks).
        expected: Current data parameters (a :class:`~ddcolor.config.DataConfig` or a mapping with ``size``,
            ``resize_mode``, ``val_fraction``, ``min_colorfulness``): adds ``manifest.config.matches`` and
            fills in whatever the manifest lacks. Without it, the manifest's ``config`` is the expectation.
        tolerances: See :class:`Tolerances`; default: the platform defaults.
        write_report: Also write ``validation_report.md`` and ``validation.json`` next to the data.
    """
    tol = tolerances or Tolerances()
    loaded = _load(uri)
    checks = list(loaded.checks)
    want = _config_of(expected)
    mcfg = (loaded.manifest or {}).get("config")
    mcfg = mcfg if isinstance(mcfg, dict) else {}
    if loaded.manifest is not None:
        types_ok = (
            isinstance(mcfg.get("size"), int)
            and isinstance(mcfg.get("val_fraction"), int | float)
            and isinstance(mcfg.get("min_colorfulness"), int | float)
        )
        checks.append(
            Check(
                "manifest.config",
                types_ok,
                observed=mcfg,
                expected="size (int), val_fraction, min_colorfulness (numbers)",
            )
        )
    if want:
        diff = {k: {"manifest": mcfg.get(k), "expected": v} for k, v in want.items() if mcfg.get(k) != v}
        checks.append(
            Check(
                "manifest.config.matches",
                not diff,
                observed={k: mcfg.get(k) for k in want},
                expected=want,
                details=f"differs: {diff}" if diff else "",
            )
        )
    cfg = {**mcfg, **want}  # the current parameters win; a mismatch already failed manifest.config.matches

    ref_stats = None
    if reference is not None:
        try:
            ref_stats = load_image_stats(reference)
        except Exception as err:  # pragma: no cover - _load catches per-file errors already
            checks.append(Check("drift.reference", False, observed=f"{type(err).__name__}: {err}", expected=reference))
        else:
            ok = len(ref_stats) > 0
            checks.append(
                Check(
                    "drift.reference",
                    ok,
                    observed=f"{len(ref_stats)} rows",
                    expected=f"readable rows at {reference}",
                )
            )
            if not ok:
                ref_stats = None

    def num(key: str) -> Any:
        value = cfg.get(key)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    checks += check_image_stats(
        loaded.stats,
        size=num("size"),
        val_fraction=num("val_fraction"),
        min_colorfulness=num("min_colorfulness"),
        tolerances=tol,
        reference=ref_stats,
    )
    result = ValidationResult(
        uri=uri,
        checks=checks,
        reference=reference,
        rows=len(loaded.stats),
        shards=loaded.shards,
        tolerances=tol,
        profile=_profile(loaded.stats, tol.drift_quantiles),
    )
    if write_report:
        write_reports(result)
    return result


def write_reports(result: ValidationResult, uri: str | None = None) -> list[str]:
    """Write ``validation_report.md`` and ``validation.json`` under ``uri`` (default: the dataset's URI).

    Returns the written URIs (also stored in ``result.report_uris``).
    """
    base = uri or result.uri
    md, js = storage.join(base, REPORT_MARKDOWN), storage.join(base, REPORT_JSON)
    storage.write_bytes(md, result.to_markdown().encode("utf-8"))
    storage.write_bytes(js, (result.to_json() + "\n").encode("utf-8"))
    result.report_uris = [md, js]
    return [md, js]
