"""The Great Expectations suite over the per-image stats frame, and drift against a reference dataset.

GX is imported lazily (several seconds) with analytics and progress bars off, in an ephemeral context.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any

from ddcolor.data.shards import SPLITS, split_for
from ddcolor.data.validate.result import DEFAULT_DRIFT_TOLERANCES, Check, Tolerances, _short
from ddcolor.data.validate.stats import STAT_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

#: Per-image columns whose quantiles are compared against a reference dataset.
DRIFT_COLUMNS = ("L_mean", "L_std", "a_mean", "b_mean", "colorfulness")


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


def drift_ranges(
    reference: pd.DataFrame,
    tolerances: Tolerances = Tolerances(),  # noqa: B008 - frozen dataclass, never mutated
) -> dict[str, dict[str, list]]:
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
    tolerances: Tolerances = Tolerances(),  # noqa: B008 - frozen dataclass, never mutated
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
