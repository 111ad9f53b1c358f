"""Tests of `ddcolor.metrics` and `ddcolor.evaluate` / `ddcolor evaluate`.

No pretrained weights exist in the test environment: every Inception / AlexNet network here is an explicit
RANDOM-INIT network (``pretrained=None``), so FID / LPIPS values only test the plumbing and invariants
(identity ~0, monotonic in noise), never real quality numbers. Cached-weights loading is tested by handing the
loaders a random state dict through a patched ``ddcolor.weights.load_state_dict``.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from skimage.metrics import peak_signal_noise_ratio
from typer.testing import CliRunner

from ddcolor import metrics as M
from ddcolor import weights
from ddcolor.color import colorfulness_np

pytestmark = [
    pytest.mark.filterwarnings("ignore:random-init:UserWarning"),
    pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning"),
]


def _gaussian(rng: np.random.Generator, n: int, d: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    mix = rng.normal(size=(d, d)) * scale / np.sqrt(d)  # known covariance mix @ mix.T
    return rng.normal(size=(n, d)) @ mix.T + shift


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=0), np.cov(x, rowvar=False)


# --- FID math --------------------------------------------------------------------------------------------------
def test_frechet_matches_scipy_reference_full_rank():
    rng = np.random.default_rng(0)
    a, b = _gaussian(rng, 400, 24), _gaussian(rng, 400, 24, scale=1.5, shift=0.3)
    mu1, s1 = _stats(a)
    mu2, s2 = _stats(b)
    ours = M.frechet_distance(mu1, s1, mu2, s2)
    ref = calculate_frechet_distance(mu1, s1, mu2, s2)  # pytorch-fid: scipy.linalg.sqrtm
    assert ours == pytest.approx(ref, rel=1e-8)
    # analytic: two Gaussians with diagonal (commuting) covariances
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = 1.0 + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert M.frechet_distance(np.zeros(3), np.diag(d1), np.eye(3)[0], np.diag(d2)) == pytest.approx(expected)


def test_frechet_singular_covariances_match_exact_trace():
    """Fewer samples than dims (singular S1, S2): Tr sqrt(S1 S2) = nuclear norm of B^T A (exact reference)."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(15, 64)) * 2.0 + 0.1
    mu1, s1 = _stats(a)
    mu2, s2 = _stats(b)
    ca, cb = (a - mu1) / np.sqrt(len(a) - 1), (b - mu2) / np.sqrt(len(b) - 1)
    tr = np.linalg.svd(cb @ ca.T, compute_uv=False).sum()
    exact = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-7)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="shape mismatch"):
        M.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_streaming_stats_equal_batch_stats(tmp_path):
    rng = np.random.default_rng(2)
    x = _gaussian(rng, 103, 16, shift=5.0)
    stats = M.FeatureStats(16)
    for chunk in np.array_split(x, 7):
        stats.update(torch.from_numpy(chunk).float() if len(chunk) % 2 else chunk)
    stats.update(np.zeros((0, 16)))
    x32 = np.concatenate([c if len(c) % 2 == 0 else c.astype(np.float32) for c in np.array_split(x, 7)])
    np.testing.assert_allclose(stats.mean(), x32.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.cov(), np.cov(x32, rowvar=False), rtol=1e-8, atol=1e-10)
    other = M.FeatureStats(16)
    other.update(x32[:50])
    merged = M.FeatureStats(16).merge(other)
    merged.update(x32[50:])
    np.testing.assert_allclose(merged.cov(), stats.cov(), rtol=1e-9)
    mu, sigma, n = M.FeatureStats.load(stats.save(tmp_path / "ref.npz", manifest_sha256="abc"))
    assert n == 103 and np.array_equal(mu, stats.mean()) and np.array_equal(sigma, stats.cov())
    with pytest.raises(ValueError, match="shape"):
        stats.update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        M.FeatureStats(4).cov()


@pytest.fixture(scope="module")
def inception192():
    """RANDOM-INIT FID Inception (pytorch-fid architecture), 192-d block: cheap, for invariants only."""
    return M.build_fid_inception(None, dims=192)


def test_fid_identical_zero_and_monotonic_in_noise(inception192):
    """Random-init Inception (not real FID): FID(X, X) ~ 0 and FID(X, X + noise) grows with the noise."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(40, 216, (12, 3, 32, 32), generator=gen, dtype=torch.uint8)
    noise = torch.randn(clean.shape, generator=gen)
    ref = M.FeatureStats(192)
    ref.update(M.inception_features(inception192, clean))
    same = M.FeatureStats(192)
    for chunk in clean.split(7):
        same.update(M.inception_features(inception192, chunk))
    assert M.frechet_distance(same.mean(), same.cov(), ref.mean(), ref.cov()) == pytest.approx(0.0, abs=1e-6)
    fids = []
    for sigma in (8.0, 30.0, 80.0):
        noisy = (clean.float() + sigma * noise).round().clamp(0, 255).to(torch.uint8)
        s = M.FeatureStats(192)
        s.update(M.inception_features(inception192, noisy))
        fids.append(M.frechet_distance(s.mean(), s.cov(), ref.mean(), ref.cov()))
    assert 0 < fids[0] < fids[1] < fids[2], fids


def test_fid_inception_2048_features_and_cache_loading(monkeypatch):
    """Standard 2048-d pool features (random init), and the cache path loads the given state dict."""
    with pytest.warns(UserWarning, match="MEANINGLESS"):
        net = M.build_fid_inception(None)
    feats = M.inception_features(net, torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    assert feats.shape == (1, M.FID_DIMS) and feats.dtype == np.float64 and np.isfinite(feats).all()
    state = M._fid_inception_v3_factory(None)().state_dict()
    state["Conv2d_1a_3x3.conv.weight"] = torch.full_like(state["Conv2d_1a_3x3.conv.weight"], 0.5)
    calls = []
    monkeypatch.setattr(weights, "load_state_dict", lambda name, **kw: calls.append(name) or state)
    net = M.build_fid_inception("cache", dims=64)
    assert calls == ["pt_inception"]
    assert torch.all(net.blocks[0][0].conv.weight == 0.5)
    with pytest.raises(ValueError, match="dims"):
        M.build_fid_inception(None, dims=100)


def test_missing_weights_name_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(weights.WeightsNotFoundError, match="ddcolor weights fetch pt_inception"):
        M.build_fid_inception("cache")
    with pytest.raises(weights.WeightsNotFoundError, match="ddcolor weights fetch alexnet"):
        M.build_lpips("cache")


# --- CF / PSNR / LPIPS -----------------------------------------------------------------------------------------
def test_colorfulness_and_psnr_match_references():
    gen = torch.Generator().manual_seed(3)
    pred = torch.randint(0, 256, (3, 3, 17, 23), generator=gen, dtype=torch.uint8)
    gt = (pred.int() + torch.randint(-20, 21, pred.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    hwc = [t.permute(1, 2, 0).numpy() for t in pred]
    np.testing.assert_allclose(M.colorfulness_uint8(pred).numpy(), [colorfulness_np(im) for im in hwc], rtol=1e-10)
    ref = [
        peak_signal_noise_ratio(g.permute(1, 2, 0).numpy(), p.permute(1, 2, 0).numpy(), data_range=255)
        for p, g in zip(pred, gt, strict=True)
    ]
    np.testing.assert_allclose(M.psnr_uint8(pred, gt).numpy(), ref, rtol=1e-10)
    assert torch.isinf(M.psnr_uint8(gt, gt)).all()
    with pytest.raises(ValueError, match="uint8"):
        M.psnr_uint8(pred.float(), gt)
    assert M.to_uint8(torch.tensor([[[[-0.1, 0.5, 1.2]]]]).expand(1, 3, 1, 3)).flatten()[:3].tolist() == [0, 128, 255]


def test_lpips_identical_zero_and_positive_for_different(monkeypatch):
    """LPIPS with a RANDOM AlexNet trunk (linear layers from the lpips wheel): identity 0, different > 0."""
    with pytest.warns(UserWarning, match="MEANINGLESS"):
        model = M.build_lpips(None)
    gen = torch.Generator().manual_seed(4)
    a = torch.randint(0, 256, (2, 3, 64, 64), generator=gen, dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 3, 64, 64), generator=gen, dtype=torch.uint8)
    assert torch.allclose(M.lpips_distance(model, a, a), torch.zeros(2, dtype=torch.float64), atol=1e-7)
    assert (M.lpips_distance(model, a, b) > 0).all()
    import torchvision

    state = torchvision.models.alexnet(weights=None).state_dict()
    monkeypatch.setattr(weights, "load_state_dict", lambda name, **kw: state)
    loaded = M.build_lpips("cache")
    assert torch.equal(getattr(loaded.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(loaded.net.slice5, "10").bias, state["features.10.bias"])


# --- evaluate end to end ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    """12 sample images at data.size 64, val_fraction 0.5; a RANDOM-INIT atto model with a small decoder."""
    from ddcolor.config import DataConfig
    from ddcolor.data.ingest import ingest
    from ddcolor.data.samples import write_samples
    from ddcolor.model import build_model

    root = tmp_path_factory.mktemp("evaluate")
    write_samples(root / "raw", 12)
    ingest(str(root / "raw"), str(root / "ds"), DataConfig(size=64, val_fraction=0.5), num_workers=0)
    torch.manual_seed(0)
    model = build_model(
        "atto", pretrained=None, num_queries=8, dec_layers=3, nf=64, hidden_dim=64, dim_feedforward=128, nheads=4
    ).eval()
    return root, model


class _RecordingTracker:
    def __init__(self):
        self.metrics, self.artifacts, self.tags = [], [], {}

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_metrics(self, metrics, step):
        self.metrics.append((dict(metrics), step))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(str(path))


def test_evaluate_end_to_end(tiny_eval):
    """Random-init model AND random-init metric networks (FID at the cheap 64-d block): plumbing only."""
    from PIL import Image

    from ddcolor.config import EvalConfig
    from ddcolor.evaluate import evaluate

    root, model = tiny_eval
    tracker = _RecordingTracker()
    out = root / "out"
    result = evaluate(
        model, root / "ds", EvalConfig(image_size=64, batch_size=4), pretrained=None, tracker=tracker,
        out_dir=out, progress=False, fid_dims=64,
    )  # fmt: skip
    manifest = json.loads((root / "ds" / "manifest.json").read_text())
    assert result.n_images == manifest["counts"]["val"] > 0
    m = result.metrics
    assert set(m) >= {"fid", "colorfulness", "delta_colorfulness", "psnr", "lpips"}
    assert m["fid"] >= 0 and m["lpips"] > 0 and np.isfinite(m["psnr"])
    assert m["delta_colorfulness"] == pytest.approx(abs(m["colorfulness"] - m["colorfulness_gt"]))
    assert "8-bit" in result.protocol["quantisation"] and "RANDOM" in result.protocol["metric_weights"]
    written = json.loads((out / "metrics.json").read_text())
    assert written["n_images"] == result.n_images and written["psnr"] == pytest.approx(m["psnr"])
    assert "| psnr |" in (out / "report.md").read_text()
    assert Image.open(out / "samples.png").size == (3 * 64 + 4, result.n_images * 66 - 2)
    logged, step = tracker.metrics[0]
    assert step == 0 and set(logged) == {
        "val/fid",
        "val/colorfulness",
        "val/delta_colorfulness",
        "val/psnr",
        "val/lpips",
        "val/n_images",
    }
    assert logged["val/n_images"] == result.n_images  # every metric record says how many images it covers
    assert tracker.tags["eval.dataset_sha256"] == result.protocol["dataset_manifest_sha256"]
    assert tracker.tags["eval.config_sha256"] == result.protocol["eval_config_sha256"]
    assert len(tracker.artifacts) == 4
    per_image = json.loads((out / "per_image.json").read_text())
    assert per_image["n_images"] == result.n_images
    for metric in ("psnr", "lpips", "colorfulness"):  # per image, in manifest order; their mean is the metric
        assert len(per_image["metrics"][metric]) == result.n_images
        assert np.mean(per_image["metrics"][metric]) == pytest.approx(m[metric], rel=1e-5)

    # resize to eval.image_size, max_images and a metric subset; a Colorizer is accepted too
    from ddcolor.colorize import Colorizer

    small = evaluate(
        Colorizer(model, input_size=64, device="cpu"), root / "ds",
        EvalConfig(image_size=96, batch_size=2, max_images=3, metrics=("psnr", "colorfulness")), progress=False,
    )  # fmt: skip
    assert small.n_images == 3 and set(small.metrics) == {"psnr", "colorfulness", "colorfulness_gt"}
    assert small.protocol["image_size"] == 96 and small.protocol["resize"] != "none"


def test_cli_evaluate(tiny_eval, monkeypatch):
    from ddcolor.cli import app
    from ddcolor.model.checkpoint import save_checkpoint

    root, model = tiny_eval
    monkeypatch.chdir(root)  # no params.yaml here: built-in defaults plus the overrides below
    ckpt = save_checkpoint(model, root / "model.safetensors")
    runner = CliRunner()
    args = ["evaluate", "--model", str(ckpt), "--data", str(root / "ds"), "--no-track", "--no-progress"]
    cheap = ["eval.max_images=2", "eval.image_size=64", "eval.metrics=[psnr,colorfulness,delta_colorfulness]"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ok = runner.invoke(app, [*args, "--out", str(root / "cli"), "--random-init-metrics", "--json", *cheap])
    assert ok.exit_code == 0, ok.output
    assert "MEANINGLESS" in ok.stderr and "2 images" in ok.stderr  # --json: human lines on stderr
    doc = json.loads(ok.stdout)
    assert doc["n_images"] == 2 and set(doc["metrics"]) >= {"psnr", "colorfulness"}
    assert json.loads((root / "cli" / "metrics.json").read_text())["n_images"] == 2
    monkeypatch.setenv(weights.ENV_VAR, str(root / "no-weights"))
    missing = runner.invoke(app, [*args, "--out", str(root / "cli2"), "eval.metrics=[fid]"])
    assert missing.exit_code == 1 and "ddcolor weights fetch pt_inception" in missing.output


def test_reference_stats_cached_per_dataset_version(tiny_eval, monkeypatch, tmp_path):
    """The cache path (weights from a patched cache: RANDOM state dicts) writes and reuses the GT statistics."""
    import torchvision

    from ddcolor.config import EvalConfig
    from ddcolor.evaluate import evaluate

    states = {"pt_inception": M._fid_inception_v3_factory(None)().state_dict()}
    states["alexnet"] = torchvision.models.alexnet(weights=None).state_dict()
    monkeypatch.setattr(weights, "load_state_dict", lambda name, **kw: states[name])
    root, model = tiny_eval
    cfg = EvalConfig(image_size=64, batch_size=8, metrics=("fid",))
    first = evaluate(model, root / "ds", cfg, stats_cache=tmp_path, progress=False, fid_dims=64)
    (cached,) = tmp_path.glob("fid_ref-*.npz")
    sha = first.protocol["dataset_manifest_sha256"]
    assert cached.name.startswith(f"fid_ref-{sha[:16]}-64-64-all-64")
    mu, _, n = M.FeatureStats.load(cached)
    assert n == first.n_images and mu.shape == (64,)
    second = evaluate(model, root / "ds", cfg, stats_cache=tmp_path, progress=False, fid_dims=64)
    assert second.metrics["fid"] == pytest.approx(first.metrics["fid"], rel=1e-6)
