"""Promotions you can trust (#13): paired statistics, the FID sample-size rule, same-data comparison with the champion,
model cards."""

from __future__ import annotations

import numpy as np
import pytest

from ddcolor.config import GatesConfig
from ddcolor.gates import GateDecision, decide
from ddcolor.stats import paired_delta, paired_deltas
from tests.helpers.images import make_random_images
from tests.helpers.recipes import TINY_RECIPE, dotted

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


# --- same-data comparison (tiny random-init models, SQLite MLflow) -------------------------------------------------


@pytest.mark.slow
def test_gate_measures_champion_and_challenger_on_the_new_dataset_version(tmp_path):
    """Champion trained on dataset v1; 10 photos ingested; the challenger trained on v2 is gated against the
    champion re-evaluated on v2 (cached on its version), paired on the same images; a run whose data the champion
    cannot be measured on fails its champion checks instead of being compared with stale numbers."""
    import json
    from pathlib import Path

    import mlflow

    from ddcolor import pipeline
    from ddcolor.comparison import CACHE_TAG_PREFIX, cache_key
    from ddcolor.config import load_config
    from ddcolor.data.samples import write_samples
    from ddcolor.registry import gate_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        None,
        {
            **dotted(TINY_RECIPE),
            "data.source": str(tmp_path / "raw"),
            "data.shards_uri": str(tmp_path / "shards"),
            "eval.max_images": None,  # the whole val split, so new images change what is measured
            "registry.model_name": "same-data",
            "registry.experiment_name": "same-data",
        },
    )
    write_samples(cfg.data.source, 8)
    run = dict(work_dir=tmp_path / "work", tracking_uri=uri, progress=False, attach_onnx=False, colorize=False)
    first = pipeline.run_pipeline(cfg, **run)
    assert first.status == "promoted", first.summary()
    v1 = first.dataset["manifest_sha256"]

    make_random_images(Path(cfg.data.source), 10, start_seed=7000)
    cfg = cfg.with_overrides({"gates.min_psnr": 1000.0})  # the challenger is judged but never promoted
    second = pipeline.run_pipeline(cfg, **run)
    v2 = second.dataset["manifest_sha256"]
    assert v2 != v1 and second.model_version == "2" and second.status == "not_promoted", second.summary()
    decision = second.decision
    assert decision["dataset_sha256"] == v2  # the decision records the data both were measured on
    assert "champion v1: re-evaluated on this val split" in decision["comparison"] and v2[:12] in decision["comparison"]

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version("same-data", "1")
    assert champion.tags["eval.dataset_sha256"] == v1  # its own evaluation was of v1 ...
    (cache_tag,) = [k for k in champion.tags if k.startswith(CACHE_TAG_PREFIX)]
    entry = json.loads(champion.tags[cache_tag])  # ... and it was measured again on v2, cached on its version
    assert cache_tag == CACHE_TAG_PREFIX + cache_key(v2, decision["eval_config_sha256"])
    assert entry["dataset_sha256"] == v2 and entry["metrics"]["n_images"] == second.metrics["n_images"]
    assert entry["metrics"]["n_images"] > float(champion.tags["metric.n_images"])  # more val images than on v1
    assert set(decision["paired"]) == {"psnr", "colorfulness"}
    for pair in decision["paired"].values():
        assert pair["n"] == entry["metrics"]["n_images"]
    cf = next(c for c in decision["checks"] if c["name"] == "colorfulness_vs_champion")
    assert cf["champion_value"] == pytest.approx(entry["metrics"]["colorfulness"])  # v2 numbers, not v1's tag
    assert cf["delta"] == pytest.approx(cf["value"] - cf["champion_value"]) and cf["ci_low"] <= cf["ci_high"]

    # the model card of the challenger: attached to the version and the run, loud about random weights
    card = client.get_model_version("same-data", "2").tags["model_card"]
    assert card.startswith("# Model card: same-data v2") and "RANDOM weights" in card and "MEANINGLESS" in card
    assert v2 in card and "## Intended use and limitations" in card and "Apache-2.0" in card
    assert "| `gates.min_psnr` |" in card  # the config diff against the champion
    assert "Paired with the champion on the same images" in card and "| psnr |" in card and "**Gate FAILED**" in card
    assert "model_card.md" in {a.path for a in client.list_artifacts(second.run_id)}
    assert "No champion to compare with" in client.get_model_version("same-data", "1").tags["model_card"]

    again = gate_run(second.run_id, cfg, tracking_uri=uri, log_to_run=False)  # computed once per dataset version
    assert again.comparison == decision["comparison"] and again.paired == decision["paired"]  # the same cache entry
    assert len([k for k in client.get_model_version("same-data", "1").tags if k.startswith(CACHE_TAG_PREFIX)]) == 1

    # a run measured on data the champion cannot be evaluated on (no dataset known): champion checks fail, with why
    experiment = client.get_experiment_by_name("same-data").experiment_id
    stray = client.create_run(experiment).info.run_id
    client.log_metric(stray, "val/colorfulness", 99.0)
    client.set_tag(stray, "eval.dataset_sha256", "ee" * 32)
    client.set_tag(stray, "eval.config_sha256", decision["eval_config_sha256"])
    stale = gate_run(stray, cfg, tracking_uri=uri, log_to_run=False)
    (check,) = [c for c in stale.checks if c.kind == "vs_champion"]
    assert not stale.passed and "not measured on the same data" in check.reason
