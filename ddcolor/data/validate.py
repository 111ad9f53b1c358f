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

Reports: :func:`write_reports` saves ``validation_report.md`` (human) and ``validation.json`` (machine) next
to the data. Great Expectations is imported lazily (several seconds) with analytics off.

Example::

    result = validate_dataset("s3://bucket/shards/v3", reference="s3://bucket/shards/v2")
    print(result.summary())
    write_reports(result)          # -> s3://bucket/shards/v3/validation_report.md, validation.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from ddcolor import storage
from ddcolor.config import ValidateConfig
from ddcolor.data.manifest import FORMAT as MANIFEST_FORMAT
from ddcolor.data.manifest import FORMAT_VERSION as MANIFEST_FORMAT_VERSION
from ddcolor.data.manifest import MANIFEST_NAME, format_problem, orphan_shards, schema_problems, shards_problem
from ddcolor.data.shards import SPLITS, decode_lab, split_for

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

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

#: Per-image stats decoded from the shards (Lab units; L in [0, 100]).
STAT_COLUMNS = (
    "L_min",
    "L_max",
    "L_mean",
    "L_std",
    "a_min",
    "a_max",
    "a_mean",
    "a_std",
    "b_min",
    "b_max",
    "b_mean",
    "b_std",
    "ab_min",
    "ab_max",
)
#: Per-image columns whose quantiles are compared against a reference dataset.
DRIFT_COLUMNS = ("L_mean", "L_std", "a_mean", "b_mean", "colorfulness")

# --- defaults: `validate:` in params.yaml (ddcolor.config.ValidateConfig) is the one place they are defined ---------
_DEFAULTS = ValidateConfig()
#: a*/b* extremes of the sRGB gamut (D65) are a in [-86.2, 98.2], b in [-107.9, 94.5]; stored values are
#: rounded to whole units, so 1 unit of slack. Anything outside cannot come from an 8-bit sRGB photo.
DEFAULT_AB_RANGE: Mapping[str, tuple[float, float]] = dict(_DEFAULTS.ab_range)
DEFAULT_DRIFT_QUANTILES = tuple(_DEFAULTS.drift_quantiles)
#: Absolute tolerance per drift column, in its own units (L*, a*, b*, Hasler-Suesstrunk colorfulness).
DEFAULT_DRIFT_TOLERANCES: Mapping[str, float] = dict(_DEFAULTS.drift_abs)


@dataclass(frozen=True)
class Tolerances:
    """How far a dataset may deviate before a check fails. Defaults are those of ``validate:`` in params.yaml
    (`ddcolor.config.ValidateConfig`); build from a config with `Tolerances.from_config(cfg.validate)`.

    Attributes:
        split_abs: Allowed |val share - val_fraction| on top of the sampling allowance below.
        split_sigmas: The hash split is a binomial draw, so a small dataset legitimately deviates; this many
            standard deviations ``sqrt(f (1 - f) / n)`` are added to ``split_abs``.
        max_low_colorfulness_share: Largest allowed share of rows flagged ``low_colorfulness``.
        ab_range: Allowed per-pixel a* and b* range (``{"a": (lo, hi), "b": (lo, hi)}``).
        colorfulness_eps: Rows whose colorfulness is this close to ``min_colorfulness`` may carry either flag
            (float32 storage rounding).
        drift_quantiles: Quantiles compared against the reference dataset.
        drift_abs: Absolute tolerance per drift column around the reference quantile.
    """

    split_abs: float = _DEFAULTS.split_abs
    split_sigmas: float = _DEFAULTS.split_sigmas
    max_low_colorfulness_share: float = _DEFAULTS.max_low_colorfulness_share
    ab_range: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_AB_RANGE))
    colorfulness_eps: float = _DEFAULTS.colorfulness_eps
    drift_quantiles: tuple[float, ...] = DEFAULT_DRIFT_QUANTILES
    drift_abs: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_DRIFT_TOLERANCES))

    @classmethod
    def from_config(cls, config: ValidateConfig) -> Tolerances:
        """The tolerances of a ``validate:`` config section."""
        return cls(
            split_abs=config.split_abs,
            split_sigmas=config.split_sigmas,
            max_low_colorfulness_share=config.max_low_colorfulness_share,
            ab_range={k: tuple(v) for k, v in config.ab_range.items()},
            colorfulness_eps=config.colorfulness_eps,
            drift_quantiles=tuple(config.drift_quantiles),
            drift_abs=dict(config.drift_abs),
        )

    def replace(self, **changes: Any) -> Tolerances:
        """A copy with some fields changed; ``drift_abs`` entries are merged into the defaults."""
        if "drift_abs" in changes:
            changes["drift_abs"] = {**self.drift_abs, **changes["drift_abs"]}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


# --- result structure ------------------------------------------------------------------------------------------
@dataclass
class Check:
    """One check: ``name`` (dotted, e.g. ``shard.sha256`` or ``gx.L_max.range``), what was seen, what was expected.

    ``details`` names the offending shards / rows when the check failed; ``source`` is ``python`` or ``gx``.
    A failed check of ``severity`` ``"warning"`` is reported but does not fail the validation.
    """

    name: str
    passed: bool
    observed: Any = None
    expected: Any = None
    details: str = ""
    source: str = "python"
    severity: str = "error"

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


@dataclass
class ValidationResult:
    """Outcome of :func:`validate_dataset`: passes iff every check of severity ``error`` passed."""

    uri: str
    checks: list[Check]
    reference: str | None = None
    rows: int = 0
    shards: int = 0
    tolerances: Tolerances = field(default_factory=Tolerances)
    profile: dict[str, dict[str, float]] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    report_uris: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return bool(self.checks) and not self.failures

    @property
    def failures(self) -> list[Check]:
        """Failed checks that fail the validation."""
        return [c for c in self.checks if not c.passed and c.severity == "error"]

    @property
    def warnings(self) -> list[Check]:
        """Failed checks of severity ``warning`` (reported only)."""
        return [c for c in self.checks if not c.passed and c.severity != "error"]

    def check(self, name: str) -> Check:
        """The check called ``name``; KeyError if there is none."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; have {[c.name for c in self.checks]}")

    def summary(self) -> str:
        """A few lines for a terminal: verdict, counts, then each failed check."""
        verdict = "PASSED" if self.success else "FAILED"
        lines = [
            f"validation {verdict}: {self.uri} ({self.rows} rows, {self.shards} shards; "
            f"{len(self.failures)} of {len(self.checks)} checks failed, {len(self.warnings)} warnings"
            + (f"; drift vs {self.reference}" if self.reference else "")
            + ")"
        ]
        for label, group in (("FAIL", self.failures), ("WARN", self.warnings)):
            for c in group:
                seen = _short(c.details, 300) if c.details else f"observed {_short(c.observed)}"
                lines.append(f"  {label} {c.name}: {seen}; expected {_short(c.expected)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "success": self.success,
                "uri": self.uri,
                "reference": self.reference,
                "created_at": self.created_at,
                "rows": self.rows,
                "shards": self.shards,
                "checks_total": len(self.checks),
                "checks_failed": len(self.failures),
                "checks_warned": len(self.warnings),
                "tolerances": self.tolerances.to_dict(),
                "profile": self.profile,
                "checks": [c.to_dict() for c in self.checks],
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def to_markdown(self) -> str:
        """The human report: verdict, failed checks, then every check in a table."""
        verdict = "PASSED" if self.success else "FAILED"
        out = [
            f"# Data validation: {verdict}",
            "",
            f"- dataset: `{self.uri}`",
            f"- reference (drift): `{self.reference}`" if self.reference else "- reference (drift): none",
            f"- rows: {self.rows}, shards: {self.shards}",
            f"- checks: {len(self.checks)}, failed: {len(self.failures)}, warnings: {len(self.warnings)}",
            f"- created: {self.created_at}",
            "",
        ]
        for title, group in (("Failed checks", self.failures), ("Warnings", self.warnings)):
            if group:
                out += [f"## {title}", ""]
                for c in group:
                    seen = _md_cell(_short(c.details, 1000)) if c.details else f"observed `{_short(c.observed, 300)}`"
                    out.append(f"- **{c.name}**: {seen}; expected `{_short(c.expected, 300)}`")
                out.append("")
        out += ["## All checks", "", "| | check | observed | expected | source |", "|---|---|---|---|---|"]
        for c in self.checks:
            mark = "ok" if c.passed else ("**FAIL**" if c.severity == "error" else "warn")
            observed, expected = _md_cell(_short(c.observed)), _md_cell(_short(c.expected))
            out.append(f"| {mark} | `{c.name}` | {observed} | {expected} | {c.source} |")
        if self.profile:
            out += ["", "## Per-image stat quantiles", "", "| column | " + " | ".join(_profile_keys(self)) + " |"]
            out.append("|---|" + "---|" * len(_profile_keys(self)))
            for col, qs in self.profile.items():
                out.append(
                    f"| {col} | " + " | ".join(f"{qs.get(k, float('nan')):.3f}" for k in _profile_keys(self)) + " |"
                )
        return "\n".join(out) + "\n"


def _profile_keys(result: ValidationResult) -> list[str]:
    return list(next(iter(result.profile.values())).keys()) if result.profile else []


# --- storage (local paths and s3://) -----------------------------------------------------------------------
# --- per-image stats ---------------------------------------------------------------------------------------
_INDEX_COLUMNS = ("source", "row", "sha256", "split", "height", "width", "colorfulness", "low_colorfulness")


def _row_stats(l_bytes: bytes | None, ab_bytes: bytes | None, height: int | None, width: int | None) -> list[float]:
    if l_bytes is None or ab_bytes is None or height is None or width is None or height <= 0 or width <= 0:
        raise ValueError("null L/ab/height/width")
    lightness, ab = decode_lab(l_bytes, ab_bytes, int(height), int(width))
    out = []
    for x in (lightness, ab[0], ab[1]):
        x = x.astype(np.float64)
        out += [x.min(), x.max(), x.mean(), x.std()]
    out += [min(out[4], out[8]), max(out[5], out[9])]
    return [float(v) for v in out]


def compute_image_stats(table: pa.Table, source: str = "") -> pd.DataFrame:
    """One row per image of a shard table: index columns, decoded Lab stats, and ``decode_error``.

    Rows whose bytes do not decode (wrong length for ``height x width``, nulls) get NaN stats and the reason
    in ``decode_error``; nothing raises for bad row contents.

    Args:
        table: A shard table with (at least) the columns of :data:`~ddcolor.data.shards.SHARD_SCHEMA`.
        source: Name of the shard (its relative path), stored in the ``source`` column.
    """
    import pandas as pd

    n = table.num_rows
    cols = {name: table.column(name).to_pylist() for name in ("sha256", "split", "height", "width", "L", "ab")}
    stats = np.full((n, len(STAT_COLUMNS)), np.nan)
    errors: list[str | None] = [None] * n
    for i in range(n):
        try:
            stats[i] = _row_stats(cols["L"][i], cols["ab"][i], cols["height"][i], cols["width"][i])
        except ValueError as err:
            errors[i] = str(err)
    frame = pd.DataFrame(
        {
            "source": [source] * n,
            "row": np.arange(n, dtype=np.int64),
            "sha256": cols["sha256"],
            "split": cols["split"],
            "height": pd.array(cols["height"], dtype="Int64"),
            "width": pd.array(cols["width"], dtype="Int64"),
            "colorfulness": np.asarray(table.column("colorfulness").to_pylist(), dtype=np.float64),
            "low_colorfulness": table.column("low_colorfulness").to_pylist(),
        }
    )
    for j, name in enumerate(STAT_COLUMNS):
        frame[name] = stats[:, j]
    frame["decode_error"] = errors
    return frame


def _empty_stats() -> pd.DataFrame:
    import pandas as pd

    cols = {c: [] for c in (*_INDEX_COLUMNS, *STAT_COLUMNS, "decode_error")}
    return pd.DataFrame(cols)


@dataclass
class _Loaded:
    manifest: dict[str, Any] | None
    stats: pd.DataFrame
    checks: list[Check]
    shards: int


def _per_shard_check(name: str, bad: Mapping[str, Any], total: int, expected: str) -> Check:
    """One check summarising a property over all shards; the failing shards are named."""
    if not bad:
        return Check(name, True, observed=f"{total}/{total} shards ok", expected=expected)
    details = "; ".join(f"{path}: {_short(why, 200)}" for path, why in bad.items())
    return Check(
        name,
        False,
        observed={"failed_shards": dict(bad)},
        expected=expected,
        details=f"{len(bad)} of {total} shards failed: {details}",
    )


def _load_manifest(uri: str, checks: list[Check]) -> dict[str, Any] | None:
    murl = storage.join(uri, MANIFEST_NAME)
    try:
        manifest = json.loads(storage.read_bytes(murl))
        if not isinstance(manifest, dict):
            raise ValueError(f"top level is {type(manifest).__name__}, expected an object")
    except Exception as err:
        checks.append(
            Check("manifest.read", False, observed=f"{type(err).__name__}: {err}", expected=f"readable JSON {murl}")
        )
        return None
    checks.append(Check("manifest.read", True, observed=murl, expected="readable JSON"))
    fmt = (manifest.get("format"), manifest.get("format_version"))
    checks.append(
        Check(
            "manifest.format",
            format_problem(manifest) is None,
            observed=list(fmt),
            expected=[MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION],
        )
    )
    shards = manifest.get("shards")
    ok = shards_problem(manifest) is None
    checks.append(
        Check(
            "manifest.shards",
            ok,
            observed=f"{len(shards)} entries" if isinstance(shards, list) else repr(shards)[:100],
            expected="a list of {path, rows, bytes, sha256, splits, low_colorfulness}",
        )
    )
    if not ok:
        manifest["shards"] = []
    paths = [s["path"] for s in manifest["shards"]]
    dups = sorted({p for p in paths if paths.count(p) > 1})
    checks.append(
        Check("manifest.shards.unique_paths", not dups, observed=dups or "unique", expected="each shard listed once")
    )
    return manifest


def _manifest_totals(manifest: dict[str, Any], checks: list[Check]) -> None:
    """Manifest ``counts`` equal the sums of its shard entries."""
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    entries = manifest["shards"]

    def total(key: str, sub: str | None = None) -> int | None:
        try:
            return sum(int(s[key][sub] if sub else s[key]) for s in entries)
        except (KeyError, TypeError, ValueError):
            return None

    sums = {
        "shards": len(entries),
        "rows": total("rows"),
        "train": total("splits", "train"),
        "val": total("splits", "val"),
        "low_colorfulness": total("low_colorfulness"),
    }
    for key, want in sums.items():
        have = counts.get(key)
        checks.append(
            Check(
                f"manifest.counts.{key}",
                want is not None and have == want,
                observed=have,
                expected=want if want is not None else "sum of shard entries (missing fields)",
                details="" if have == want else f"manifest counts.{key} = {have}, sum over shard entries = {want}",
            )
        )


def _load(uri: str, *, check_files: bool = True) -> _Loaded:
    """Read manifest and shards: file-level checks plus the per-image stats frame of every usable shard."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    checks: list[Check] = []
    manifest = _load_manifest(uri, checks)
    if manifest is None:
        return _Loaded(None, _empty_stats(), checks, 0)
    _manifest_totals(manifest, checks)

    entries = manifest["shards"]
    bad: dict[str, dict[str, Any]] = {
        k: {} for k in ("read", "bytes", "sha256", "parquet", "schema", "rows", "splits", "low_colorfulness", "decode")
    }
    frames = []
    for entry in entries:
        path = entry["path"]
        try:
            data = storage.read_bytes(storage.join(uri, path))
        except Exception as err:
            bad["read"][path] = f"{type(err).__name__}: {err}"
            continue
        if entry.get("bytes") != len(data):
            bad["bytes"][path] = {"file": len(data), "manifest": entry.get("bytes")}
        digest = hashlib.sha256(data).hexdigest()
        if entry.get("sha256") != digest:
            bad["sha256"][path] = {"file": digest, "manifest": entry.get("sha256")}
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as err:
            bad["parquet"][path] = f"{type(err).__name__}: {err}"
            continue
        problems = schema_problems(table.schema)
        if problems:
            bad["schema"][path] = "; ".join(problems)
            continue
        try:
            frame = compute_image_stats(table, source=path)
        except Exception as err:  # e.g. nulls in non-nullable columns of a hand-made file
            bad["parquet"][path] = f"cannot read rows: {type(err).__name__}: {err}"
            continue
        frames.append(frame)
        if entry.get("rows") != len(frame):
            bad["rows"][path] = {"file": len(frame), "manifest": entry.get("rows")}
        splits = {s: int((frame["split"] == s).sum()) for s in SPLITS}
        want_splits = entry.get("splits")
        if not isinstance(want_splits, dict) or {s: want_splits.get(s) for s in SPLITS} != splits:
            bad["splits"][path] = {"file": splits, "manifest": want_splits}
        low = int(frame["low_colorfulness"].fillna(False).astype(bool).sum())
        if entry.get("low_colorfulness") != low:
            bad["low_colorfulness"][path] = {"file": low, "manifest": entry.get("low_colorfulness")}
        errors = frame.loc[frame["decode_error"].notna(), ["row", "decode_error"]]
        if len(errors):
            bad["decode"][path] = (
                f"{len(errors)} rows, e.g. row {errors['row'].iloc[0]}: {errors['decode_error'].iloc[0]}"
            )

    n = len(entries)
    expectations = {
        "read": "every listed shard file can be read",
        "bytes": "file size equals manifest bytes",
        "sha256": "file sha256 equals manifest sha256",
        "parquet": "file parses as Parquet",
        "schema": "columns and Arrow types equal SHARD_SCHEMA",
        "rows": "row count equals manifest rows",
        "splits": "train/val row counts equal manifest splits",
        "low_colorfulness": "low-colorfulness row count equals manifest low_colorfulness",
        "decode": "L/ab byte lengths match height x width in every row",
    }
    for key, expected in expectations.items():
        checks.append(_per_shard_check(f"shard.{key}", bad[key], n, expected))

    if check_files:
        try:
            unlisted: list[str] | None = orphan_shards(uri, {"shards": entries})
        except storage.StorageError:
            unlisted = None  # cannot list: no verdict either way
        if unlisted is not None:
            checks.append(
                Check(
                    "shard.unlisted_files",
                    not unlisted,
                    observed=unlisted or "none",
                    expected="every .parquet file under shards/ is in the manifest",
                    details=f"not in manifest (readers ignore them; e.g. left by an interrupted ingest): {unlisted}"
                    if unlisted
                    else "",
                    severity="warning",
                )
            )
    stats = pd.concat(frames, ignore_index=True) if frames else _empty_stats()
    return _Loaded(manifest, stats, checks, n)


def load_image_stats(uri: str) -> pd.DataFrame:
    """Per-image stats of every readable, well-formed shard of the dataset at ``uri`` (no checks reported)."""
    return _load(uri, check_files=False).stats


# --- the Great Expectations suite --------------------------------------------------------------------------
def _gx_context():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET and not logging.getLogger().isEnabledFor(logging.DEBUG):
        gx_logger.setLevel(logging.WARNING)  # GX logs hundreds of INFO lines on import
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx, gx.get_context(mode="ephemeral", project_config=config)


def _split_bounds(val_fraction: float, n: int, tol: Tolerances) -> tuple[float, float]:
    sigma = math.sqrt(val_fraction * (1 - val_fraction) / max(n, 1))
    slack = tol.split_abs + tol.split_sigmas * sigma
    return max(0.0, val_fraction - slack), min(1.0, val_fraction + slack)


def drift_ranges(reference: pd.DataFrame, tolerances: Tolerances = Tolerances()) -> dict[str, dict[str, list]]:
    """GX ``quantile_ranges`` per drift column: reference quantile ± ``tolerances.drift_abs[column]``."""
    qs = list(tolerances.drift_quantiles)
    out = {}
    for col in DRIFT_COLUMNS:
        values = reference[col].dropna().astype(float)
        if values.empty:
            continue
        ref = values.quantile(qs, interpolation="linear").tolist()
        tol = float(tolerances.drift_abs.get(col, DEFAULT_DRIFT_TOLERANCES[col]))
        out[col] = {"quantiles": qs, "value_ranges": [[q - tol, q + tol] for q in ref], "reference": ref}
    return out


def _expectations(
    gxe, stats: pd.DataFrame, size: int | None, val_fraction: float | None, min_cf: float | None, tol: Tolerances
) -> list[tuple[str, Any, str]]:
    """(check name, expectation, human 'expected') for the suite."""
    exps: list[tuple[str, Any, str]] = []

    def add(name: str, exp: Any, expected: str) -> None:
        exps.append((name, exp, expected))

    add("gx.sha256.not_null", gxe.ExpectColumnValuesToNotBeNull(column="sha256"), "no null sha256")
    add("gx.sha256.unique", gxe.ExpectColumnValuesToBeUnique(column="sha256"), "every sha256 unique")
    add("gx.split.values", gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)), f"in {SPLITS}")
    for col in ("colorfulness", *STAT_COLUMNS):
        add(f"gx.{col}.not_null", gxe.ExpectColumnValuesToNotBeNull(column=col), "no NaN / null")
    add("gx.colorfulness.range", gxe.ExpectColumnValuesToBeBetween(column="colorfulness", min_value=0), ">= 0")
    if size is not None:
        for col in ("height", "width"):
            add(f"gx.{col}.size", gxe.ExpectColumnValuesToBeInSet(column=col, value_set=[int(size)]), f"== {size}")
    for col in ("L_min", "L_max"):
        add(f"gx.{col}.range", gxe.ExpectColumnValuesToBeBetween(column=col, min_value=0, max_value=100), "in [0, 100]")
    for ch in ("a", "b"):
        lo, hi = tol.ab_range[ch]
        add(f"gx.{ch}_min.range", gxe.ExpectColumnValuesToBeBetween(column=f"{ch}_min", min_value=lo), f">= {lo}")
        add(f"gx.{ch}_max.range", gxe.ExpectColumnValuesToBeBetween(column=f"{ch}_max", max_value=hi), f"<= {hi}")
    if val_fraction is not None:
        lo, hi = _split_bounds(val_fraction, len(stats), tol)
        add(
            "gx.split.matches_hash",
            gxe.ExpectColumnValuesToBeInSet(column="split_matches_hash", value_set=[True]),
            f"split == split_for(sha256, {val_fraction})",
        )
        add(
            "gx.split.val_share",
            gxe.ExpectColumnMeanToBeBetween(column="is_val", min_value=lo, max_value=hi),
            f"val share in [{lo:.4f}, {hi:.4f}] (val_fraction {val_fraction})",
        )
    if min_cf is not None:
        add(
            "gx.low_colorfulness.flag",
            gxe.ExpectColumnValuesToBeInSet(column="low_flag_matches", value_set=[True]),
            f"low_colorfulness == (colorfulness < {min_cf})",
        )
    add(
        "gx.low_colorfulness.share",
        gxe.ExpectColumnMeanToBeBetween(column="is_low", min_value=0, max_value=tol.max_low_colorfulness_share),
        f"<= {tol.max_low_colorfulness_share}",
    )
    return exps


def _derived(stats: pd.DataFrame, val_fraction: float | None, min_cf: float | None, tol: Tolerances) -> pd.DataFrame:
    frame = stats.copy()
    frame["is_val"] = (frame["split"] == "val").astype(float)
    low = frame["low_colorfulness"].astype("boolean").fillna(False).astype(bool)
    frame["is_low"] = low.astype(float)
    if val_fraction is not None:
        frame["split_matches_hash"] = [
            isinstance(h, str) and len(h) >= 8 and split_for(h, val_fraction) == s
            for h, s in zip(frame["sha256"], frame["split"], strict=True)
        ]
    if min_cf is not None:
        cf = frame["colorfulness"].astype(float)
        frame["low_flag_matches"] = (low == (cf < min_cf)) | ((cf - min_cf).abs() <= tol.colorfulness_eps)
    return frame


def _check_from_gx(name: str, expected: str, r: Any) -> Check:
    info = r.exception_info or {}
    errors = []
    if isinstance(info, dict):
        if info.get("raised_exception"):
            errors.append(info.get("exception_message"))
        errors += [
            v.get("exception_message") for v in info.values() if isinstance(v, dict) and v.get("raised_exception")
        ]
    result = r.result or {}
    if errors:
        return Check(name, False, observed=f"error: {errors[0]}", expected=expected, source="gx")
    if "observed_value" in result:
        observed = result["observed_value"]
        details = ""
        if name.startswith("drift.") and isinstance(observed, dict):
            kw = r.expectation_config.kwargs["quantile_ranges"]
            outside = [
                f"q{q:g}={v:.3f} not in [{lo:.3f}, {hi:.3f}]"
                for q, v, (lo, hi) in zip(kw["quantiles"], observed["values"], kw["value_ranges"], strict=True)
                if not lo <= v <= hi
            ]
            details = "; ".join(outside)
        return Check(name, bool(r.success), observed=observed, expected=expected, details=details, source="gx")
    unexpected = int(result.get("unexpected_count") or 0)
    total = int(result.get("element_count") or 0)
    details = ""
    if unexpected:
        examples = []
        for item in (result.get("partial_unexpected_index_list") or [])[:10]:
            if isinstance(item, dict):
                value = {k: v for k, v in item.items() if k not in ("source", "row")}
                examples.append(f"{item.get('source')}#{item.get('row')} {_short(value, 80)}")
        details = f"{unexpected} of {total} rows; e.g. " + ", ".join(examples) if examples else ""
    return Check(
        name,
        bool(r.success),
        observed=f"{unexpected} of {total} rows unexpected",
        expected=expected,
        details=details,
        source="gx",
    )


def check_image_stats(
    stats: pd.DataFrame,
    *,
    size: int | None,
    val_fraction: float | None,
    min_colorfulness: float | None,
    tolerances: Tolerances = Tolerances(),
    reference: pd.DataFrame | None = None,
) -> list[Check]:
    """Run the Great Expectations suite on a per-image stats frame (as from :func:`compute_image_stats`).

    ``None`` for ``size`` / ``val_fraction`` / ``min_colorfulness`` skips the checks that need it. With a
    ``reference`` stats frame, drift checks (``drift.<column>.quantiles``) are added. GX errors become failed
    checks; this never raises for bad data.
    """
    tol = tolerances
    try:
        gx, ctx = _gx_context()
        import great_expectations.expectations as gxe
    except Exception as err:  # pragma: no cover - broken install
        return [Check("gx.suite", False, observed=f"{type(err).__name__}: {err}", expected="GX importable")]
    frame = _derived(stats, val_fraction, min_cf=min_colorfulness, tol=tol)
    exps = [("gx.table.row_count", gxe.ExpectTableRowCountToBeBetween(min_value=1), ">= 1 row")]
    if len(frame):
        exps += _expectations(gxe, frame, size, val_fraction, min_colorfulness, tol)
        if reference is not None:
            ranges = drift_ranges(reference, tol)
            for col, rng in ranges.items():
                exp = gxe.ExpectColumnQuantileValuesToBeBetween(
                    column=col,
                    quantile_ranges={"quantiles": rng["quantiles"], "value_ranges": rng["value_ranges"]},
                    allow_relative_error="linear",
                )
                tol_c = tol.drift_abs.get(col, DEFAULT_DRIFT_TOLERANCES[col])
                expected = {
                    "quantiles": rng["quantiles"],
                    "reference": [round(v, 4) for v in rng["reference"]],
                    "tolerance": tol_c,
                }
                exps.append((f"drift.{col}.quantiles", exp, expected))
    suite = gx.ExpectationSuite(name="ddcolor_shards")
    names = {}
    for i, (name, exp, expected) in enumerate(exps):
        exp.meta = {"check": name, "index": i}
        suite.add_expectation(exp)
        names[i] = (name, expected)
    try:
        source = ctx.data_sources.add_pandas(name="ddcolor")
        batch_def = source.add_dataframe_asset(name="image_stats").add_batch_definition_whole_dataframe("all")
        batch = batch_def.get_batch(batch_parameters={"dataframe": frame})
        res = batch.validate(
            suite,
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": 10,
                "unexpected_index_column_names": ["source", "row"],
            },
        )
    except Exception as err:
        return [Check("gx.suite", False, observed=f"{type(err).__name__}: {err}", expected="suite runs", source="gx")]
    checks = []
    for r in res.results:
        name, expected = names[int(r.expectation_config.meta["index"])]
        checks.append(_check_from_gx(name, expected, r))
    checks.sort(key=lambda c: [n for n, _, _ in exps].index(c.name))
    if reference is not None and not (len(frame) and drift_ranges(reference, tol)):
        checks.append(Check("drift.skipped", False, observed="no rows to compare", expected="rows in both datasets"))
    return checks


# --- the whole validation ----------------------------------------------------------------------------------
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


# --- helpers -----------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """Plain JSON types (numpy scalars -> Python, NaN -> None, tuples -> lists, mappings -> dicts)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(_jsonable(value), separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
