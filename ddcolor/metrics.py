"""Image-quality metrics for colorization: FID, colorfulness (CF, ΔCF), PSNR and LPIPS.

Every metric works on **8-bit RGB** images (``uint8`` tensors of shape (B, 3, H, W)), the same quantised
images a user would save, so numbers do not depend on float details of the pipeline.

* **FID** — ``pytorch-fid`` 0.3.0's InceptionV3 (the port of TF's ``inception-2015-12-05`` graph, file
  ``pt_inception-2015-12-05-6726825d.pth`` from the weights cache, ``ddcolor.weights.resolve("pt_inception")``),
  bilinear resize to 299, 2048-d pool features. Features are accumulated in float64 by `FeatureStats` (running
  sum and sum of outer products: bounded memory for any number of images); the Fréchet distance is computed
  with an eigen-decomposition of the symmetric PSD product ``sqrt(S1) S2 sqrt(S1)`` (`frechet_distance`), which
  equals ``Tr sqrtm(S1 S2)`` of pytorch-fid's scipy version without its complex round-off.
* **CF** — Hasler & Süsstrunk colorfulness (`ddcolor.color.colorfulness`) on 0..255 RGB, mean over images;
  **ΔCF** = |CF(pred) − CF(gt)| at dataset level.
* **PSNR** — on 8-bit RGB, per image (data range 255), then the mean over images.
* **LPIPS** — the ``lpips`` package, ``net="alex"``, version 0.1; its linear layers ship in the wheel, the
  AlexNet trunk is loaded from the weights cache (``alexnet``) by this module, never downloaded.

Video (temporal consistency; a*, b* in Lab units, float (2, H, W) per frame):

* **Warp error** — `warp_error` / `video_warp_error`: mean squared ab difference between frame t and frame t-1
  warped to it by the flow, over non-occluded pixels (Lai et al. 2018); the flow and mask come from the known
  motion of synthetic clips or from `ddcolor.temporal` (DIS + forward-backward check).
* **CDC** — `color_distribution_consistency`: Jensen-Shannon divergence of ab histograms of frames t, t+k
  (Liu et al. 2021).
* `video_psnr_colorfulness`: per-frame PSNR / colorfulness against ground truth, averaged.

``pretrained=None`` builds **random-init** Inception / AlexNet networks: smoke tests only, the numbers are
meaningless (a warning says so). Missing weights raise `ddcolor.weights.WeightsNotFoundError`, whose message
names ``ddcolor weights fetch``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddcolor import storage
from ddcolor._optional import require
from ddcolor.color import colorfulness

__all__ = [
    "FID_DIMS",
    "RANDOM_INIT_WARNING",
    "FeatureStats",
    "build_fid_inception",
    "build_lpips",
    "color_distribution_consistency",
    "colorfulness_uint8",
    "frechet_distance",
    "inception_features",
    "lpips_distance",
    "psnr_uint8",
    "to_uint8",
    "video_psnr_colorfulness",
    "video_warp_error",
    "warp_error",
]

log = logging.getLogger(__name__)

FID_DIMS = 2048
RANDOM_INIT_WARNING = (
    "random-init {what}: metric values are MEANINGLESS and not comparable to anything (smoke tests only)"
)
_PATCH_LOCK = threading.Lock()


# --- 8-bit helpers ---------------------------------------------------------------------------------------------
def to_uint8(rgb01: torch.Tensor) -> torch.Tensor:
    """Quantise float sRGB in [0, 1] to uint8 (clamp, ×255, round half to even as torch.round)."""
    return (rgb01.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def _check_uint8(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a uint8 tensor of shape (B, 3, H, W), got {got}")


def colorfulness_uint8(images: torch.Tensor) -> torch.Tensor:
    """Per-image colorfulness (float64, shape (B,)) of uint8 RGB images, on the 0..255 scale."""
    _check_uint8(images, "images")
    return colorfulness(images.double())


def psnr_uint8(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (float64, shape (B,)) of uint8 RGB images, data range 255 (``inf`` if identical).

    Matches ``skimage.metrics.peak_signal_noise_ratio(gt, pred, data_range=255)`` per image.
    """
    _check_uint8(pred, "pred")
    _check_uint8(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = (pred.double() - target.double()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(255.0**2 / mse)


# --- FID -------------------------------------------------------------------------------------------------------
class FeatureStats:
    """Streaming mean / covariance of feature vectors, accumulated in float64.

    Keeps ``n``, the running sum and the running sum of outer products, so memory is O(dim²) whatever the
    number of images. ``cov()`` is the unbiased (N − 1) covariance, as ``np.cov(rowvar=False)`` in pytorch-fid.
    """

    def __init__(self, dim: int = FID_DIMS) -> None:
        self.dim = dim
        self.n = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.sum_outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        """Add a batch of feature vectors, shape (N, dim)."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another accumulator's features to this one (returns self)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge FeatureStats of dim {other.dim} into dim {self.dim}")
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("no features accumulated")
        return self.sum / self.n

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"the covariance needs at least 2 feature vectors, got {self.n}")
        mu = self.mean()
        cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2.0

    def save(self, path: str | Path, **meta: Any) -> Path:
        """Write ``mu``, ``sigma``, ``n`` (and string metadata) to an ``.npz`` file, atomically."""
        path = Path(path)
        arrays = {"mu": self.mean(), "sigma": self.cov(), "n": np.asarray(self.n)}
        arrays.update({f"meta_{k}": np.asarray(str(v)) for k, v in meta.items()})

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
                np.savez(fh, **arrays)

        storage.write_local_atomic(path, write)
        return path

    @staticmethod
    def load(path: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
        """Read ``(mu, sigma, n)`` written by `save`."""
        with np.load(path) as data:
            return data["mu"], data["sigma"], int(data["n"])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance ``|mu1 − mu2|² + Tr(S1 + S2 − 2 sqrt(S1 S2))`` between two Gaussians.

    ``Tr sqrt(S1 S2)`` is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``sqrt(S1) S2 sqrt(S1)`` (similar to S1 S2, so the same spectrum): real, stable for singular covariances
    (fewer images than dimensions), no eps retry needed. With S1 = V diag(l) V^T restricted to its range
    (l > 1e-12 max l), that spectrum is the one of the small matrix ``H^T S2 H``, H = V sqrt(l), which makes
    the second eigen-decomposition cheap when there are fewer images than dimensions. Clipped at 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    vals, vecs = np.linalg.eigh((sigma1 + sigma1.T) / 2.0)
    keep = vals > max(float(vals.max(initial=0.0)), 0.0) * 1e-12  # sqrt(S1) lives in S1's range: restrict to it
    half = vecs[:, keep] * np.sqrt(vals[keep])  # sqrt(S1) = half @ half.T ... up to the basis: same spectrum
    product = half.T @ sigma2 @ half
    eig = np.linalg.eigvalsh((product + product.T) / 2.0) if product.size else np.zeros(0)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def _fid_inception_v3_factory(state_dict: dict[str, torch.Tensor] | None):
    """A stand-in for ``pytorch_fid.inception.fid_inception_v3`` that loads `state_dict` instead of downloading."""
    pfi = require("pytorch_fid.inception", "train", "FID")

    def build() -> nn.Module:
        net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = pfi.FIDInceptionE_1(1280)
        net.Mixed_7c = pfi.FIDInceptionE_2(2048)
        if state_dict is not None:
            net.load_state_dict(state_dict, strict=True)
        else:
            for module in net.modules():  # keep activations O(1) through ~50 random layers
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        return net

    return build


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any):
    with _PATCH_LOCK:
        old = getattr(module, name)
        setattr(module, name, value)
        try:
            yield
        finally:
            setattr(module, name, old)


def _cached_state_dict(name: str, pretrained: str | None, what: str) -> dict | None:
    """Weights of a metric network: from the weights cache ("cache"), or None for an explicit random init (warned)."""
    if pretrained == "cache":
        from ddcolor import weights

        return weights.load_state_dict(name)
    if pretrained is None:
        warnings.warn(RANDOM_INIT_WARNING.format(what=what), stacklevel=3)
        return None
    raise ValueError(f"pretrained must be 'cache' or None, got {pretrained!r}")


def build_fid_inception(pretrained: str | None = "cache", *, dims: int = FID_DIMS, seed: int = 0) -> nn.Module:
    """pytorch-fid's ``InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)``.

    Args:
        pretrained: ``"cache"``: the FID weights from the weights cache (``pt_inception``; never downloaded);
            ``None``: explicit random init (seeded by `seed`; smoke tests only, warns).
        dims: feature block, as pytorch-fid's ``--dims``: 2048 (the standard FID, pool features), or 64 / 192 /
            768 (earlier blocks: cheaper, for smoke tests only).

    Returns:
        The network in eval mode without gradients; input float RGB in [0, 1], output ``[(B, dims, h, w)]``.

    Raises:
        ddcolor.weights.WeightsNotFoundError: the cache lacks the file (the message names the fetch command).
    """
    pfi = require("pytorch_fid.inception", "train", "FID")

    if dims not in pfi.InceptionV3.BLOCK_INDEX_BY_DIM:
        raise ValueError(f"dims must be one of {sorted(pfi.InceptionV3.BLOCK_INDEX_BY_DIM)}, got {dims}")
    state = _cached_state_dict("pt_inception", pretrained, what="FID InceptionV3")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _patched(pfi, "fid_inception_v3", _fid_inception_v3_factory(state)):
            net = pfi.InceptionV3(
                [pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]],
                resize_input=True,
                normalize_input=True,
                use_fid_inception=True,
            )
    return net.eval().requires_grad_(False)


@torch.no_grad()
def inception_features(net: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Features (float64 numpy, shape (B, dims)) of uint8 RGB images: the 2048-d pool features for FID.

    Blocks before the pool (dims < 2048) are spatially averaged, as pytorch-fid does for them.
    """
    _check_uint8(images, "images")
    device = next(net.parameters()).device
    x = images.to(device).float() / 255.0
    feats = net(x)[0]
    if feats.shape[-2:] != (1, 1):
        feats = torch.nn.functional.adaptive_avg_pool2d(feats, (1, 1))
    return feats.flatten(1).double().cpu().numpy()


# --- LPIPS -----------------------------------------------------------------------------------------------------
def build_lpips(pretrained: str | None = "cache", *, seed: int = 0) -> nn.Module:
    """``lpips.LPIPS(net="alex", version="0.1")`` with the AlexNet trunk from the weights cache.

    The linear calibration layers always come from the ``lpips`` wheel. ``pretrained="cache"`` loads the
    torchvision AlexNet state dict (``alexnet`` entry of the weights cache) into the trunk; ``None`` keeps an
    explicit random trunk (seeded; smoke tests only, warns). Nothing is downloaded.

    Raises:
        ddcolor.weights.WeightsNotFoundError: the cache lacks ``alexnet``.
    """
    lpips = require("lpips", "train", "LPIPS")

    state = _cached_state_dict("alexnet", pretrained, what="LPIPS AlexNet trunk")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation inside lpips
        torch.manual_seed(seed)
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    if state is not None:
        trunk = {}
        for key in model.net.state_dict():  # slice{k}.{i}.weight  <-  features.{i}.weight
            _, index, param = key.split(".")
            trunk[key] = state[f"features.{index}.{param}"]
        model.net.load_state_dict(trunk, strict=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def lpips_distance(model: nn.Module, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS (float64, shape (B,)) between uint8 RGB images (scaled to [-1, 1] as lpips expects)."""
    _check_uint8(pred, "pred")
    _check_uint8(target, "target")
    device = next(model.parameters()).device
    a = pred.to(device).float() / 127.5 - 1.0
    b = target.to(device).float() / 127.5 - 1.0
    return model(a, b).flatten().double().cpu()


# --- video: temporal consistency ---------------------------------------------------------------------------------
def _warp_hw(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    from ddcolor.temporal import warp  # OpenCV, only needed by the video metrics

    return warp(image, flow)


def warp_error(ab_prev: np.ndarray, ab_cur: np.ndarray, flow: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Temporal warp error of one frame pair (Lai et al. 2018, "Learning Blind Video Temporal Consistency", on ab).

    Args:
        ab_prev, ab_cur: float (2, H, W) a*, b* (Lab units) of frames t-1 and t.
        flow: float32 (H, W, 2) flow t -> t-1 (frame t's pixel x is at x + flow(x) in frame t-1).
        mask: (H, W) 1 = visible in both frames (non-occluded); None = all pixels.

    Returns:
        mean over the mask of ``|ab_t(x) - ab_{t-1}(x + flow(x))|^2`` (squared Lab units); 0 if the mask is empty.
    """
    warped = _warp_hw(np.ascontiguousarray(np.asarray(ab_prev, np.float32).transpose(1, 2, 0)), flow)
    err = np.sum((np.asarray(ab_cur, np.float32).transpose(1, 2, 0) - warped) ** 2, axis=2)
    weight = np.ones_like(err) if mask is None else np.asarray(mask, np.float32)
    total = float(weight.sum())
    return float((err * weight).sum() / total) if total else 0.0


def video_warp_error(
    abs_: list[np.ndarray], flows: list[np.ndarray], masks: list[np.ndarray | None] | None = None
) -> float:
    """Mean `warp_error` over consecutive pairs: ``flows[i]`` / ``masks[i]`` belong to frames (i, i+1)."""
    masks = masks or [None] * len(flows)
    if len(flows) != len(abs_) - 1 or len(masks) != len(flows):
        raise ValueError(f"need T-1 flows and masks for T frames, got {len(flows)}, {len(masks)} for {len(abs_)}")
    pairs = [warp_error(abs_[i], abs_[i + 1], flows[i], masks[i]) for i in range(len(flows))]
    return float(np.mean(pairs)) if pairs else 0.0


def _ab_histogram(ab: np.ndarray, bins: int) -> np.ndarray:
    hist, _, _ = np.histogram2d(np.ravel(ab[0]), np.ravel(ab[1]), bins=bins, range=[[-128.0, 128.0], [-128.0, 128.0]])
    return hist.ravel() / max(hist.sum(), 1.0)


def color_distribution_consistency(abs_: list[np.ndarray], step: int = 1, bins: int = 32) -> float:
    """CDC: mean Jensen-Shannon divergence (bits, 0..1) of the 2-D ab histograms of frames t and t+step.

    The color-distribution-consistency index of Liu et al. 2021 ("Temporally Consistent Video Colorization with
    Deep Feature Propagation and Self-regularization Learning"), computed on the joint ab histogram instead of
    per-RGB-channel histograms; lower is more consistent. Motion-free: flicker of global tint shows here even
    where the flow is unreliable.
    """
    if len(abs_) <= step:
        return 0.0
    hists = [_ab_histogram(np.asarray(ab), bins) for ab in abs_]
    values = []
    for p, q in zip(hists[:-step], hists[step:], strict=True):
        m = 0.5 * (p + q)
        kl = lambda a, b: float(np.sum(a[a > 0] * np.log2(a[a > 0] / b[a > 0])))  # noqa: E731
        values.append(0.5 * kl(p, m) + 0.5 * kl(q, m))
    return float(np.mean(values))


def video_psnr_colorfulness(pred: list[np.ndarray], target: list[np.ndarray] | None = None) -> dict[str, float]:
    """Per-frame 8-bit RGB PSNR (dB, against ``target``) and colorfulness, averaged over frames.

    Args:
        pred, target: uint8 (H, W, 3) RGB frames; ``target`` None gives colorfulness only.

    Returns:
        {"psnr": mean dB (absent without target), "colorfulness": mean CF of pred, "colorfulness_gt": of target}.
    """
    to_t = lambda frames: torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    out = {"colorfulness": float(colorfulness_uint8(to_t(pred)).mean())}
    if target is not None:
        out["psnr"] = float(psnr_uint8(to_t(pred), to_t(target)).mean())
        out["colorfulness_gt"] = float(colorfulness_uint8(to_t(target)).mean())
    return out
