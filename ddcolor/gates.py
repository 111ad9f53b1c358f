"""Promotion gates: decide whether a challenger's eval metrics may replace the champion (pure; no MLflow).

Two kinds of check, each off when its `GatesConfig` field is null:

* ``absolute``: FID <= ``max_fid``, colorfulness >= ``min_colorfulness``, ΔCF <= ``max_delta_colorfulness``,
  PSNR >= ``min_psnr``;
* ``vs_champion`` (only when a champion exists): FID <= champion FID + ``fid_margin_vs_champion``; colorfulness,
  PSNR and LPIPS within ``*_margin_vs_champion`` of the champion's. Both models must have been measured on the same
  val split (`ddcolor.comparison` arranges that); for the per-image metrics the comparison is *paired* on the same
  images (`ddcolor.stats.PairedDelta`: mean delta and bootstrap 95% interval), and with ``require_interval`` the
  whole interval must clear the margin.

Sample size: FID on fewer than ``min_fid_images`` images (default 2048, the Inception feature dimension) is
dominated by bias; such an FID check fails with that reason unless ``allow_small_fid_sample`` is set (then the
reason says the sample was small). Metrics carry ``n_images``.

A metric an enabled check needs but that is missing (or NaN) fails that check with a reason saying so. Metric names
may be bare (``fid``) or as tracked (``val/fid``). Usage::

    decision = decide({"fid": 12.0, "n_images": 5000}, cfg.gates, champion_metrics={"fid": 12.3}, paired=deltas)
    decision.passed, decision.table(), decision.to_dict()
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ddcolor.config import GatesConfig
from ddcolor.stats import PairedDelta

__all__ = ["GateCheck", "GateDecision", "decide", "normalize_metrics"]

#: (check name, gates field, metric, operator) of the absolute checks.
_ABSOLUTE = (
    ("max_fid", "max_fid", "fid", "<="),
    ("min_colorfulness", "min_colorfulness", "colorfulness", ">="),
    ("max_delta_colorfulness", "max_delta_colorfulness", "delta_colorfulness", "<="),
    ("min_psnr", "min_psnr", "psnr", ">="),
)
#: (check name, gates field, metric, operator, sign of the margin) of the checks against the champion.
_RELATIVE = (
    ("fid_vs_champion", "fid_margin_vs_champion", "fid", "<=", 1.0),
    ("colorfulness_vs_champion", "colorfulness_margin_vs_champion", "colorfulness", ">=", -1.0),
    ("psnr_vs_champion", "psnr_margin_vs_champion", "psnr", ">=", -1.0),
    ("lpips_vs_champion", "lpips_margin_vs_champion", "lpips", "<=", 1.0),
)


@dataclass(frozen=True)
class GateCheck:
    """One gate: `value` (the challenger's metric) `op` `threshold`.

    Attributes:
        name: e.g. ``max_fid`` or ``fid_vs_champion``.
        metric: the metric compared (``fid``, ``colorfulness``, ``delta_colorfulness``, ``psnr``).
        value: the challenger's value, None when missing.
        threshold: the bound it is compared to (for ``vs_champion``: champion value ± margin), None when unknown.
        champion_value: the champion's value (``vs_champion`` checks only).
        passed: whether the check passed.
        kind: ``absolute`` or ``vs_champion``.
        op: ``<=`` or ``>=``.
        reason: one line saying why it passed or failed.
        n_images: images the challenger's value was measured on (None when unknown).
        delta, ci_low, ci_high: paired challenger − champion mean difference and its bootstrap 95% interval (per-image
            metrics against a champion measured on the same images; None otherwise).
    """

    name: str
    metric: str
    value: float | None
    threshold: float | None
    champion_value: float | None
    passed: bool
    kind: Literal["absolute", "vs_champion"] = "absolute"
    op: str = "<="
    reason: str = ""
    n_images: int | None = None
    delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


@dataclass(frozen=True)
class GateDecision:
    """The outcome of `decide`: passed when every enabled check passed (and vacuously when none is enabled).

    Attributes:
        dataset_sha256, eval_config_sha256: the val split (dataset manifest sha256) and evaluation settings both
            models were measured on (None when unknown).
        comparison: one line saying how the champion's numbers were obtained (recorded, cached, re-evaluated).
        paired: ``{metric: PairedDelta.to_dict()}`` for the per-image metrics compared on the same images.
    """

    passed: bool
    checks: tuple[GateCheck, ...] = field(default_factory=tuple)
    champion_version: str | None = None
    dataset_sha256: str | None = None
    eval_config_sha256: str | None = None
    comparison: str | None = None
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"passed", "champion_version", "dataset_sha256", ..., "checks": [{name, ...}, ...]}``."""
        return {
            "passed": self.passed,
            "champion_version": self.champion_version,
            "dataset_sha256": self.dataset_sha256,
            "eval_config_sha256": self.eval_config_sha256,
            "comparison": self.comparison,
            "paired": self.paired,
            "checks": [asdict(c) for c in self.checks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateDecision:
        known = GateCheck.__dataclass_fields__
        checks = tuple(GateCheck(**{k: v for k, v in c.items() if k in known}) for c in data.get("checks", ()))
        return cls(
            passed=bool(data["passed"]),
            checks=checks,
            champion_version=data.get("champion_version"),
            dataset_sha256=data.get("dataset_sha256"),
            eval_config_sha256=data.get("eval_config_sha256"),
            comparison=data.get("comparison"),
            paired=dict(data.get("paired") or {}),
        )

    def table(self) -> str:
        """A Markdown table of the checks, with a verdict line (and the data both models were measured on) above."""
        verdict = "PASSED" if self.passed else "FAILED"
        champion = f"champion v{self.champion_version}" if self.champion_version else "no champion"
        lines = [
            f"**Gate {verdict}** ({champion}; {sum(c.passed for c in self.checks)}/{len(self.checks)} checks passed)",
            "",
        ]
        if self.comparison:
            lines += [f"Measured on: {self.comparison}", ""]
        lines += [
            "| check | kind | metric | n | value | op | threshold | champion | Δ vs champion [95% CI] | result "
            "| reason |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in self.checks:
            interval = "-" if c.delta is None else f"{c.delta:+.4g} [{_fmt(c.ci_low)}, {_fmt(c.ci_high)}]"
            cells = (
                c.name,
                c.kind,
                c.metric,
                "-" if c.n_images is None else str(c.n_images),
                _fmt(c.value),
                c.op,
                _fmt(c.threshold),
                _fmt(c.champion_value),
                interval,
                "pass" if c.passed else "FAIL",
                c.reason.replace("|", "\\|"),
            )
            lines.append("| " + " | ".join(cells) + " |")
        if not self.checks:
            lines.append("| (no gate enabled) | | | | | | | | | pass | |")
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def normalize_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """``{"val/fid": 1, "n_images": 3, "note": "x"}`` -> ``{"fid": 1.0, "n_images": 3.0}``: numeric values only,
    the ``val/`` prefix dropped (a bare name wins over its ``val/`` twin), NaN dropped."""
    out: dict[str, float] = {}
    for key, value in sorted((metrics or {}).items(), key=lambda kv: not kv[0].startswith("val/")):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        value = float(value)
        if math.isnan(value):
            continue
        out[key.removeprefix("val/")] = value
    return out


def _compare(value: float, op: str, threshold: float) -> bool:
    return value <= threshold if op == "<=" else value >= threshold


def _fid_sample(n: float | None, gates: GatesConfig) -> tuple[bool, str]:
    """(may the FID check be decided on this sample, note for the reason)."""
    if n is None:
        if gates.allow_small_fid_sample:
            return True, " (sample size unknown; allowed by gates.allow_small_fid_sample)"
        return False, "n_images unknown: cannot tell whether FID has enough images (gates.min_fid_images)"
    if n >= gates.min_fid_images:
        return True, ""
    if gates.allow_small_fid_sample:
        return (
            True,
            f" (SMALL SAMPLE: {n:.0f} < {gates.min_fid_images} images, allowed by gates.allow_small_fid_sample)",
        )
    return False, (
        f"FID on {n:.0f} images < gates.min_fid_images {gates.min_fid_images}: too few for FID (bias dominates); "
        "evaluate on more images, or set gates.allow_small_fid_sample: true for a demo"
    )


def decide(
    metrics: Mapping[str, Any],
    gates: GatesConfig,
    champion_metrics: Mapping[str, Any] | None = None,
    champion_version: str | None = None,
    *,
    paired: Mapping[str, PairedDelta] | None = None,
    dataset_sha256: str | None = None,
    eval_config_sha256: str | None = None,
    comparison: str | None = None,
    comparison_problem: str | None = None,
) -> GateDecision:
    """Apply the enabled gates to the challenger's `metrics` (and the champion's, when there is one).

    Args:
        metrics: the challenger's eval metrics (``fid`` or ``val/fid`` keys, ``n_images``; non-numeric values
            ignored).
        gates: thresholds and margins; a null field turns its check off.
        champion_metrics: the champion's metrics on the same validation set; None = no champion, so only the
            absolute thresholds apply.
        champion_version: recorded in the decision (for the blessing and the table).
        paired: per-image comparisons on the same images (`ddcolor.stats.paired_deltas`); the per-image
            ``*_vs_champion`` checks use them (means, delta, interval) instead of the recorded means.
        dataset_sha256, eval_config_sha256, comparison: what both models were measured on, recorded in the decision.
        comparison_problem: why the champion could not be measured on the same data; every ``*_vs_champion``
            check then fails with it (stale numbers are not compared).
    """
    values = normalize_metrics(metrics)
    n = values.get("n_images")
    n_int = None if n is None else int(n)
    checks: list[GateCheck] = []
    for name, attr, metric, op in _ABSOLUTE:
        threshold = getattr(gates, attr)
        if threshold is None:
            continue
        value = values.get(metric)
        if value is None:
            reason = f"metric {metric!r} missing"
            checks.append(GateCheck(name, metric, None, threshold, None, False, "absolute", op, reason, n_int))
            continue
        note = ""
        if metric == "fid":
            ok, note = _fid_sample(n, gates)
            if not ok:
                checks.append(
                    GateCheck(name, metric, value, float(threshold), None, False, "absolute", op, note, n_int)
                )
                continue
        passed = _compare(value, op, threshold)
        reason = f"{metric} {value:.4g} {op if passed else _negate(op)} {threshold:.4g}{note}"
        checks.append(GateCheck(name, metric, value, float(threshold), None, passed, "absolute", op, reason, n_int))

    if champion_metrics is not None:
        champion = normalize_metrics(champion_metrics)
        for name, attr, metric, op, sign in _RELATIVE:
            margin = getattr(gates, attr)
            if margin is None:
                continue
            if comparison_problem:
                reason = f"champion not measured on the same data: {comparison_problem}"
                checks.append(GateCheck(name, metric, values.get(metric), None, None, False, "vs_champion", op, reason))
                continue
            checks.append(
                _relative(name, metric, op, sign, margin, values, champion, (paired or {}).get(metric), gates)
            )

    return GateDecision(
        passed=all(c.passed for c in checks),
        checks=tuple(checks),
        champion_version=champion_version,
        dataset_sha256=dataset_sha256,
        eval_config_sha256=eval_config_sha256,
        comparison=comparison,
        paired={k: d.to_dict() for k, d in (paired or {}).items()},
    )


def _relative(
    name: str,
    metric: str,
    op: str,
    sign: float,
    margin: float,
    values: Mapping[str, float],
    champion: Mapping[str, float],
    pair: PairedDelta | None,
    gates: GatesConfig,
) -> GateCheck:
    n = values.get("n_images")
    n_int = None if n is None else int(n)
    shown = f"margin {margin:g}"
    if pair is not None:  # the same images: means over the paired images, plus the interval of the difference
        value, base = pair.challenger_mean, pair.champion_mean
        threshold = base + sign * margin
        interval = dict(n_images=pair.n, delta=pair.mean_delta, ci_low=pair.ci_low, ci_high=pair.ci_high)
        described = f"Δ {pair.describe()} over {pair.n} paired images"
        if gates.require_interval:
            bound = pair.ci_low if op == ">=" else pair.ci_high
            passed = _compare(bound, op, sign * margin)
            end = "low" if op == ">=" else "high"
            reason = (
                f"{metric} {described}: interval {end} end {bound:+.4g} {op if passed else _negate(op)} "
                f"{sign * margin:+g} ({shown}, gates.require_interval)"
            )
        else:
            passed = _compare(pair.mean_delta, op, sign * margin)
            reason = f"{metric} {described}: mean {op if passed else _negate(op)} {sign * margin:+g} ({shown})"
        return GateCheck(name, metric, value, threshold, base, passed, "vs_champion", op, reason, **interval)

    value, base = values.get(metric), champion.get(metric)
    threshold = None if base is None else base + sign * margin
    reason = ""
    if value is None:
        reason = f"metric {metric!r} missing"
    elif base is None:
        reason = f"champion has no {metric!r} metric to compare with"
    elif metric == "fid":
        ok, note = _fid_sample(n, gates)
        if not ok:
            reason = note
    elif gates.require_interval:
        reason = f"no per-image {metric} values of both models on the same images: no interval (gates.require_interval)"
    if reason:
        return GateCheck(name, metric, value, threshold, base, False, "vs_champion", op, reason, n_int)
    note = _fid_sample(n, gates)[1] if metric == "fid" else ""
    passed = _compare(value, op, threshold)
    shown = f"champion {base:.4g} {'+' if sign > 0 else '-'} margin {margin:g}"
    reason = f"{metric} {value:.4g} {op if passed else _negate(op)} {shown}{note}"
    return GateCheck(name, metric, value, threshold, base, passed, "vs_champion", op, reason, n_int)


def _negate(op: str) -> str:
    return ">" if op == "<=" else "<"
