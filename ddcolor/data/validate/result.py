"""The validation result: `Tolerances` (how far a dataset may deviate), `Check`, `ValidationResult` and its
terminal summary, JSON and Markdown renderings.

Also the rendering helpers the package's other modules share (`_jsonable`, `_short`, `_md_cell`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from ddcolor.config import ValidateConfig

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
