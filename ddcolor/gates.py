"""Promotion gates: decide whether a challenger's eval metrics may replace the champion (pure; no MLflow).

Two kinds of check, each off when its `GatesConfig` field is null:

* ``absolute``: FID <= ``max_fid``, colorfulness >= ``min_colorfulness``, ΔCF <= ``max_delta_colorfulness``,
  PSNR >= ``min_psnr``;
* ``vs_champion`` (only when a champion exists, on the same validation set): FID <= champion FID +
  ``fid_margin_vs_champion``, colorfulness >= champion colorfulness - ``colorfulness_margin_vs_champion``.

A metric an enabled check needs but that is missing (or NaN) fails that check with a reason saying so. Metric names
may be bare (``fid``) or as tracked (``val/fid``). Usage::

    decision = decide({"fid": 12.0, "colorfulness": 30.1}, cfg.gates, champion_metrics={"fid": 12.3, ...})
    decision.passed, decision.table(), decision.to_dict()
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ddcolor.config import GatesConfig

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


@dataclass(frozen=True)
class GateDecision:
    """The outcome of `decide`: passed when every enabled check passed (and vacuously when none is enabled)."""

    passed: bool
    checks: tuple[GateCheck, ...] = field(default_factory=tuple)
    champion_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"passed", "champion_version", "checks": [{name, metric, value, ...}, ...]}``."""
        return {
            "passed": self.passed,
            "champion_version": self.champion_version,
            "checks": [asdict(c) for c in self.checks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateDecision:
        checks = tuple(GateCheck(**c) for c in data.get("checks", ()))
        return cls(passed=bool(data["passed"]), checks=checks, champion_version=data.get("champion_version"))

    def table(self) -> str:
        """A Markdown table of the checks, with a verdict line above it."""
        verdict = "PASSED" if self.passed else "FAILED"
        champion = f"champion v{self.champion_version}" if self.champion_version else "no champion"
        lines = [
            f"**Gate {verdict}** ({champion}; {sum(c.passed for c in self.checks)}/{len(self.checks)} checks passed)",
            "",
            "| check | kind | metric | value | op | threshold | champion | result | reason |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in self.checks:
            cells = (
                c.name,
                c.kind,
                c.metric,
                _fmt(c.value),
                c.op,
                _fmt(c.threshold),
                _fmt(c.champion_value),
                "pass" if c.passed else "FAIL",
                c.reason.replace("|", "\\|"),
            )
            lines.append("| " + " | ".join(cells) + " |")
        if not self.checks:
            lines.append("| (no gate enabled) | | | | | | | pass | |")
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


def decide(
    metrics: Mapping[str, Any],
    gates: GatesConfig,
    champion_metrics: Mapping[str, Any] | None = None,
    champion_version: str | None = None,
) -> GateDecision:
    """Apply the enabled gates to the challenger's `metrics` (and the champion's, when there is one).

    Args:
        metrics: the challenger's eval metrics (``fid`` or ``val/fid`` keys; non-numeric values ignored).
        gates: thresholds and margins; a null field turns its check off.
        champion_metrics: the champion's metrics on the same validation set; None = no champion, so only the
            absolute thresholds apply.
        champion_version: recorded in the decision (for the blessing and the table).
    """
    values = normalize_metrics(metrics)
    checks: list[GateCheck] = []
    for name, attr, metric, op in _ABSOLUTE:
        threshold = getattr(gates, attr)
        if threshold is None:
            continue
        value = values.get(metric)
        if value is None:
            checks.append(
                GateCheck(name, metric, None, threshold, None, False, "absolute", op, f"metric {metric!r} missing")
            )
            continue
        passed = _compare(value, op, threshold)
        reason = f"{metric} {value:.4g} {op if passed else _negate(op)} {threshold:.4g}"
        checks.append(GateCheck(name, metric, value, float(threshold), None, passed, "absolute", op, reason))

    if champion_metrics is not None:
        champion = normalize_metrics(champion_metrics)
        for name, attr, metric, op, sign in _RELATIVE:
            margin = getattr(gates, attr)
            if margin is None:
                continue
            value, base = values.get(metric), champion.get(metric)
            threshold = None if base is None else base + sign * margin
            if value is None:
                reason = f"metric {metric!r} missing"
            elif base is None:
                reason = f"champion has no {metric!r} metric to compare with"
            if value is None or base is None:
                checks.append(GateCheck(name, metric, value, threshold, base, False, "vs_champion", op, reason))
                continue
            passed = _compare(value, op, threshold)
            shown = f"champion {base:.4g} {'+' if sign > 0 else '-'} margin {margin:g}"
            reason = f"{metric} {value:.4g} {op if passed else _negate(op)} {shown}"
            checks.append(GateCheck(name, metric, value, threshold, base, passed, "vs_champion", op, reason))

    return GateDecision(passed=all(c.passed for c in checks), checks=tuple(checks), champion_version=champion_version)


def _negate(op: str) -> str:
    return ">" if op == "<=" else "<"
