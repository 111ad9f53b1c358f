"""Paired statistics for comparing two models on the same images: mean difference and a bootstrap interval.

Per-image metrics (PSNR in dB, LPIPS, colorfulness on the 0..255 scale) of a challenger and a champion measured on
the *same* images, in the same order, are compared pairwise: ``delta_i = challenger_i - champion_i``. The mean delta
is the difference of the dataset means; its 95% interval is a percentile bootstrap over images (resampling pairs,
seeded, so the same inputs give the same interval). Pairing removes the image-to-image spread that dominates an
unpaired comparison of two means on a few hundred images.

Usage::

    d = paired_delta("psnr", challenger_psnr, champion_psnr)       # PairedDelta(metric, n, mean_delta, ci_low, ...)
    d.ci_low > -0.1                                                # the interval clears a margin
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["BOOTSTRAP_SAMPLES", "PER_IMAGE_METRICS", "PairedDelta", "paired_delta", "paired_deltas"]

#: Per-image metrics that can be paired, and whether higher is better.
PER_IMAGE_METRICS: Mapping[str, bool] = {"psnr": True, "lpips": False, "colorfulness": True}
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class PairedDelta:
    """``challenger - champion`` on the same images.

    Attributes:
        metric: ``psnr`` (dB), ``lpips`` or ``colorfulness``.
        n: pairs used (images where both values are finite).
        mean_delta: mean of the per-image differences (= difference of the means over those images).
        ci_low, ci_high: percentile bootstrap interval of the mean difference at `level`.
        level: the interval's coverage, e.g. 0.95.
        challenger_mean, champion_mean: the two means over the same `n` images.
        higher_is_better: the metric's direction.
    """

    metric: str
    n: int
    mean_delta: float
    ci_low: float
    ci_high: float
    level: float
    challenger_mean: float
    champion_mean: float
    higher_is_better: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairedDelta:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def describe(self) -> str:
        """``+0.42 [+0.10, +0.77]`` (mean delta and interval)."""
        return f"{self.mean_delta:+.4g} [{self.ci_low:+.4g}, {self.ci_high:+.4g}]"


def paired_delta(
    metric: str,
    challenger: Sequence[float] | np.ndarray,
    champion: Sequence[float] | np.ndarray,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDelta:
    """The paired comparison of one per-image metric (see the module docstring).

    Raises:
        ValueError: the two arrays differ in length (not the same images), or no pair is finite.
    """
    a = np.asarray(challenger, dtype=np.float64)
    b = np.asarray(champion, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"{metric}: per-image values must be two 1-d arrays over the same images, got {a.shape} "
                         f"and {b.shape}")  # fmt: skip
    keep = np.isfinite(a) & np.isfinite(b)  # PSNR is inf on an exact match
    a, b = a[keep], b[keep]
    if not len(a):
        raise ValueError(f"{metric}: no image has a finite value for both models")
    delta = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 256):  # bounded memory for large n
        stop = min(start + 256, samples)
        idx = rng.integers(0, len(delta), size=(stop - start, len(delta)))
        means[start:stop] = delta[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedDelta(
        metric=metric,
        n=len(delta),
        mean_delta=float(delta.mean()),
        ci_low=float(low),
        ci_high=float(high),
        level=level,
        challenger_mean=float(a.mean()),
        champion_mean=float(b.mean()),
        higher_is_better=PER_IMAGE_METRICS.get(metric, True),
    )


def paired_deltas(
    challenger: Mapping[str, Sequence[float]],
    champion: Mapping[str, Sequence[float]],
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    level: float = 0.95,
) -> dict[str, PairedDelta]:
    """`paired_delta` for every metric of `PER_IMAGE_METRICS` present in both per-image records."""
    out = {}
    for metric in PER_IMAGE_METRICS:
        if metric in challenger and metric in champion:
            out[metric] = paired_delta(metric, challenger[metric], champion[metric], samples=samples, level=level)
    return out
