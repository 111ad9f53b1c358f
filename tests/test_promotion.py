"""Promotions you can trust (#13): paired statistics, the FID sample-size rule, same-data comparison with the champion,
model cards."""

from __future__ import annotations

import numpy as np
import pytest

from ddcolor.config import GatesConfig
from ddcolor.gates import GateDecision, decide
from ddcolor.stats import paired_delta, paired_deltas

# --- paired statistics (pure) ------------------------------------------------------------------------------------


def test_paired_delta_of_a_constant_shift_is_that_shift_with_a_zero_width_interval():
    champion = np.linspace(20.0, 30.0, 50)
    d = paired_delta("psnr", champion + 0.5, champion)
    assert d.n == 50 and d.mean_delta == pytest.approx(0.5)
    assert d.ci_low == pytest.approx(0.5) and d.ci_high == pytest.approx(0.5)
    assert d.challenger_mean == pytest.approx(25.5) and d.higher_is_better
    assert paired_delta("lpips", [0.2, 0.3], [0.1, 0.1]).higher_is_better is False


def test_paired_interval_is_deterministic_covers_the_mean_and_drops_non_finite_pairs():
    rng = np.random.default_rng(0)
    champion = rng.normal(25, 3, 200)
    challenger = champion + 0.3 + rng.normal(0, 1, 200)
    d = paired_delta("psnr", challenger, champion)
    assert d == paired_delta("psnr", challenger, champion)  # seeded bootstrap
    assert d.ci_low < d.mean_delta < d.ci_high and d.ci_high - d.ci_low < 1.0
    # pairing removes the image-to-image spread: the unpaired standard error is ~3x larger here
    unpaired_se = np.sqrt(challenger.var() / 200 + champion.var() / 200)
    assert (d.ci_high - d.ci_low) < 2 * 1.96 * unpaired_se / 2
    challenger[0] = np.inf  # PSNR of an exact match
    assert paired_delta("psnr", challenger, champion).n == 199
    with pytest.raises(ValueError, match="same images"):
        paired_delta("psnr", challenger[:10], champion)
    assert set(paired_deltas({"psnr": [1.0], "lpips": [0.1]}, {"psnr": [1.0], "colorfulness": [3.0]})) == {"psnr"}


def _noisy_gain() -> tuple[dict, dict]:
    """Challenger PSNR 0.2 dB better on average but with a noisy paired difference: interval straddles 0."""
    rng = np.random.default_rng(1)
    champion = rng.normal(25, 3, 40)
    noise = rng.normal(0, 2, 40)
    challenger = champion + 0.2 + noise - noise.mean()  # mean gain exactly 0.2 dB
    return {"psnr": challenger}, {"psnr": champion}


def test_paired_margin_check_with_and_without_the_interval():
    challenger, champion = _noisy_gain()
    deltas = paired_deltas(challenger, champion)
    d = deltas["psnr"]
    assert d.mean_delta > 0 > d.ci_low  # the premise of this test
    off = {"fid_margin_vs_champion": None, "colorfulness_margin_vs_champion": None}
    metrics = {"psnr": float(np.mean(challenger["psnr"])), "n_images": 40}
    champ = {"psnr": float(np.mean(champion["psnr"]))}
    mean_only = decide(metrics, GatesConfig(**off, psnr_margin_vs_champion=0.0), champ, "1", paired=deltas)
    assert mean_only.passed
    strict = GatesConfig(**off, psnr_margin_vs_champion=0.0, require_interval=True)
    interval = decide(metrics, strict, champ, "1", paired=deltas, comparison="dataset abc (same process)")
    (check,) = interval.checks
    assert not interval.passed and check.name == "psnr_vs_champion"
    assert "interval low end" in check.reason and "gates.require_interval" in check.reason
    assert (check.delta, check.ci_low, check.ci_high, check.n_images) == (d.mean_delta, d.ci_low, d.ci_high, 40)
    table = interval.table()
    assert "Measured on: dataset abc (same process)" in table and f"{d.mean_delta:+.4g} [" in table
    assert GateDecision.from_dict(interval.to_dict()) == interval
    assert interval.to_dict()["paired"]["psnr"]["n"] == 40
    # a margin wide enough for the whole interval passes; without per-image values the interval check cannot pass
    assert decide(metrics, strict.model_copy(update={"psnr_margin_vs_champion": 5.0}), champ, paired=deltas).passed
    no_pairs = decide(metrics, strict, champ, "1")
    assert not no_pairs.passed and "no per-image psnr values" in no_pairs.checks[0].reason
    # LPIPS: lower is better, the interval's high end must stay under the margin
    lpips = paired_deltas({"lpips": [0.30, 0.32, 0.31]}, {"lpips": [0.2, 0.21, 0.2]})
    worse = decide({"n_images": 3}, GatesConfig(**off, lpips_margin_vs_champion=0.05), {}, paired=lpips)
    assert not worse.passed and worse.checks[0].op == "<="


def test_small_fid_sample_fails_with_the_reason_unless_allowed():
    gates = GatesConfig(max_fid=50.0, fid_margin_vs_champion=1.0, colorfulness_margin_vs_champion=None)
    small = decide({"fid": 10.0, "n_images": 4}, gates, {"fid": 10.0, "n_images": 4}, "2")
    assert not small.passed and all("gates.min_fid_images 2048" in c.reason for c in small.checks)
    allowed = decide({"fid": 10.0, "n_images": 4}, gates.model_copy(update={"allow_small_fid_sample": True}))
    assert allowed.passed and "SMALL SAMPLE: 4 < 2048" in allowed.checks[0].reason
    assert decide({"fid": 10.0, "n_images": 2048}, gates, None).passed
