"""Offline evaluation of a colorization model on a dataset's validation split: `evaluate`.

Protocol (also returned as ``EvalResult.protocol`` and written to ``report.md``):

1. The val split of the shard dataset, in manifest order, each image once (center crop at ``data.size`` if the
   shards are larger); resized (bilinear, antialiased, on L and ab) to ``eval.image_size`` when that differs.
2. The network sees the gray image built from the ground-truth L (a = b = 0); its ab is clamped to
   [-128, 127]. Prediction = ``lab_to_rgb(L_gt, ab_pred)``, ground truth = ``lab_to_rgb(L_gt, ab_gt)``.
3. Both are quantised to 8-bit RGB (clamp, ×255, round) before any metric.
4. Metrics (`ddcolor.metrics`): FID (pytorch-fid InceptionV3, 2048-d, pred vs gt of the same images),
   CF (mean over images), ΔCF = |CF(pred) − CF(gt)|, PSNR (per image, mean), LPIPS (alex, v0.1, mean).

Ground-truth FID statistics (real Inception weights only) are cached per dataset version (manifest sha256),
image sizes, image limit and feature dims in
``<stats_cache>/fid_ref-<sha16>-<eval size>-<data size>-<max_images>-<dims>.npz`` and reused on later runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddcolor import metrics as M
from ddcolor import storage
from ddcolor.color import gray_rgb_from_l, lab_to_rgb

__all__ = ["METRIC_KEYS", "PER_IMAGE_FILE", "EvalResult", "default_stats_cache", "eval_config_sha256", "evaluate"]

log = logging.getLogger(__name__)

#: metric name -> tracker key
METRIC_KEYS = {
    "fid": "val/fid",
    "colorfulness": "val/colorfulness",
    "delta_colorfulness": "val/delta_colorfulness",
    "psnr": "val/psnr",
    "lpips": "val/lpips",
    "n_images": "val/n_images",
}
#: Per-image values (manifest order) written next to metrics.json and logged as ``eval/per_image.json``.
PER_IMAGE_FILE = "per_image.json"
#: Run tags an evaluation writes: what the metrics were measured on (`ddcolor.comparison` reads them).
EVAL_TAGS = ("eval.dataset_sha256", "eval.config_sha256", "eval.dataset_uri")
SAMPLE_ROWS = 8


@dataclass
class EvalResult:
    """What `evaluate` measured: flat ``metrics`` (as in ``metrics.json``), image count, the protocol, and the
    per-image values (``{"psnr": [...], "lpips": [...], "colorfulness": [...]}``, manifest order) that a paired
    comparison with another model on the same images needs."""

    metrics: dict[str, float]
    n_images: int
    protocol: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    per_image: dict[str, list[float]] = field(default_factory=dict)


def eval_config_sha256(eval_config: Any, *, pretrained: str | None, fid_dims: int = M.FID_DIMS) -> str:
    """sha256 of what makes two evaluations of the same dataset comparable: the ``eval`` section (minus batch size),
    the metric weights actually used (``cache`` or random) and the FID feature block."""
    settings = eval_config.model_dump(mode="json")
    settings.pop("batch_size", None)
    settings.update(metric_networks="cache" if pretrained == "cache" else "random", fid_dims=fid_dims)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def default_stats_cache() -> Path:
    """``$DDCOLOR_CACHE_DIR/fid_stats`` if set, else ``~/.cache/ddcolor/fid_stats``."""
    root = os.environ.get("DDCOLOR_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "ddcolor") / "fid_stats"


def _network(model: Any, precision: str, device: str | torch.device | None) -> tuple[nn.Module, str]:
    """An eval-mode module mapping gray RGB (B, 3, H, W) to ab (B, 2, H, W), and its precision."""
    from ddcolor.colorize import Colorizer
    from ddcolor.model.ddcolor import DDColor
    from ddcolor.model.inference import prepare_for_inference
    from ddcolor.precision import resolve_precision

    if isinstance(model, Colorizer):
        if model.engine != "torch":
            raise ValueError("evaluate() needs a torch Colorizer (engine='torch')")
        return model.net, model.precision
    if isinstance(model, DDColor):
        param = next(model.parameters(), None)
        where = device if device is not None else (param.device if param is not None else "cpu")
        precision = resolve_precision(precision, where)
        return prepare_for_inference(model, precision), precision
    if isinstance(model, nn.Module):
        return model.eval(), "as given"
    raise TypeError(f"model must be a DDColor, a Colorizer or an nn.Module, got {type(model).__name__}")


def _configs(eval_config: Any, data_config: Any, manifest: dict[str, Any]):
    from ddcolor.config import Config, DataConfig, EvalConfig

    if isinstance(eval_config, Config):
        data_config = data_config or eval_config.data
        eval_config = eval_config.eval
    eval_config = eval_config or EvalConfig()
    stored = (manifest.get("config") or {}).get("size")
    size = int(stored or (data_config.size if data_config else eval_config.image_size))
    base = data_config or DataConfig()
    return eval_config, base.model_copy(update={"size": size})


def _resize(t: torch.Tensor, size: int) -> torch.Tensor:
    if t.shape[-2:] == (size, size):
        return t
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _grid(rows: list[tuple[np.ndarray, ...]]) -> np.ndarray:
    """Stack (gray, pred, gt) uint8 HWC triples into one image, 2 px white gutters."""
    h, w, _ = rows[0][0].shape
    pad = 2
    grid = np.full((len(rows) * (h + pad) - pad, 3 * (w + pad) - pad, 3), 255, np.uint8)
    for r, triple in enumerate(rows):
        for c, img in enumerate(triple):
            grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = img
    return grid


def _report(metrics: dict[str, float], n: int, protocol: dict[str, Any]) -> str:
    lines = ["# Evaluation report", "", f"{n} images.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    lines += ["", "## Protocol", ""]
    lines += [f"- **{k}**: {v}" for k, v in protocol.items()]
    lines += ["", "## Samples (gray | prediction | ground truth)", "", "![samples](samples.png)", ""]
    return "\n".join(lines)


def _per_image_record(result: EvalResult) -> dict[str, Any]:
    return {
        "dataset_manifest_sha256": result.protocol["dataset_manifest_sha256"],
        "eval_config_sha256": result.protocol["eval_config_sha256"],
        "n_images": result.n_images,
        "order": "val split, manifest order",
        "metrics": result.per_image,
    }


@torch.no_grad()
def evaluate(
    model_or_colorizer: Any,
    dataset_uri: str | os.PathLike[str],
    eval_config: Any = None,
    *,
    data_config: Any = None,
    pretrained: str | None = "cache",
    tracker: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    stats_cache: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    step: int = 0,
    fid_dims: int = M.FID_DIMS,
    precision: str = "auto",
    metric_networks: dict[str, nn.Module] | None = None,
) -> EvalResult:
    """Evaluate a colorization model on the val split of a shard dataset (protocol: the module docstring).

    Args:
        model_or_colorizer: a `DDColor` (run through `prepare_for_inference`), a torch `Colorizer`, or any module
            mapping gray RGB to ab.
        dataset_uri: shard dataset folder or ``s3://`` prefix (from `ddcolor.data.ingest.ingest`).
        eval_config: an `EvalConfig` or a whole `Config` (then its ``data`` section is used too); None: defaults.
        data_config: `DataConfig` for the loader (its ``size`` is taken from the manifest).
        pretrained: ``"cache"`` (Inception / AlexNet from the weights cache) or ``None``: explicit random-init
            metric networks (smoke tests; FID and LPIPS are meaningless, a warning says so).
        tracker: a `ddcolor.tracking.Tracker`; metrics are logged as ``val/<name>`` and the outputs as artifacts.
        out_dir: where ``metrics.json``, ``report.md`` and ``samples.png`` go (None: nothing written).
        stats_cache: folder for cached ground-truth FID statistics (default `default_stats_cache`); only used
            with cached (real) Inception weights.
        device: where the model and metric networks run (default: the model's device).
        progress: show a progress bar.
        step: tracker step for the logged metrics.
        fid_dims: Inception feature block for FID: 2048 (standard); 64/192/768 only for cheap smoke tests.
        metric_networks: ``{"inception": ..., "lpips": ...}`` already built (`ddcolor.metrics`), to measure two
            models with the very same networks; None builds them from `pretrained`.
        precision: of a `DDColor`'s forward (`ddcolor.precision`): "auto" (bf16 where native, else fp32), "fp32",
            "bf16", "fp16"; a `Colorizer` keeps its own. The metric networks always run in fp32.

    Raises:
        ddcolor.weights.WeightsNotFoundError: FID / LPIPS weights missing (names ``ddcolor weights fetch``).
        ValueError: the val split is empty.
    """
    from PIL import Image
    from tqdm import tqdm

    from ddcolor.data.loader import build_dataloader
    from ddcolor.data.manifest import manifest_sha256, read_manifest

    uri = str(dataset_uri)
    manifest = read_manifest(uri)
    eval_config, data_config = _configs(eval_config, data_config, manifest)
    wanted = set(eval_config.metrics)
    size = eval_config.image_size
    net, precision = _network(model_or_colorizer, precision, device)
    if device is None:
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    net = net.to(device)

    need_fid, need_lpips = "fid" in wanted, "lpips" in wanted
    given = metric_networks or {}
    inception = (given.get("inception") or M.build_fid_inception(pretrained, dims=fid_dims)) if need_fid else None
    lpips_net = (given.get("lpips") or M.build_lpips(pretrained)) if need_lpips else None
    inception = inception.to(device) if inception is not None else None
    lpips_net = lpips_net.to(device) if lpips_net is not None else None

    manifest_sha = manifest_sha256(uri)
    val_rows = int((manifest.get("counts") or {}).get("val") or 0) or None
    n_total = min(val_rows, eval_config.max_images) if val_rows and eval_config.max_images else val_rows
    ref_path = None
    ref = None
    if need_fid and pretrained == "cache":
        cache = Path(stats_cache) if stats_cache is not None else default_stats_cache()
        limit = eval_config.max_images or "all"
        ref_path = cache / f"fid_ref-{manifest_sha[:16]}-{size}-{data_config.size}-{limit}-{fid_dims}.npz"
        if ref_path.is_file():
            ref = M.FeatureStats.load(ref_path)
            log.info("using cached reference FID statistics %s", ref_path)

    pred_stats, gt_stats = M.FeatureStats(fid_dims), M.FeatureStats(fid_dims)
    cf_pred: list[torch.Tensor] = []
    cf_gt: list[torch.Tensor] = []
    psnr: list[torch.Tensor] = []
    lpips_values: list[torch.Tensor] = []
    samples: list[tuple[np.ndarray, ...]] = []
    n = 0
    loader = build_dataloader(data_config, uri, "val", eval_config.batch_size, rank=0, world_size=1, num_workers=0)
    bar = tqdm(total=n_total, desc="evaluate", unit="img", disable=not progress)
    for batch in loader:
        lightness = batch["l"].float()
        ab_gt = batch["ab"].float()
        if eval_config.max_images is not None:
            keep = eval_config.max_images - n
            if keep <= 0:
                break
            lightness, ab_gt = lightness[:keep], ab_gt[:keep]
        lightness, ab_gt = _resize(lightness, size), _resize(ab_gt, size)
        gray = gray_rgb_from_l(lightness)
        ab_pred = net(gray.to(device)).float().cpu().clamp(-128.0, 127.0)
        if ab_pred.shape[-2:] != lightness.shape[-2:]:
            ab_pred = F.interpolate(ab_pred, size=lightness.shape[-2:], mode="bilinear", align_corners=False)
        pred = M.to_uint8(lab_to_rgb(torch.cat([lightness, ab_pred], dim=1)))
        gt = M.to_uint8(lab_to_rgb(torch.cat([lightness, ab_gt], dim=1)))
        if inception is not None:
            pred_stats.update(M.inception_features(inception, pred))
            if ref is None:
                gt_stats.update(M.inception_features(inception, gt))
        cf_pred.append(M.colorfulness_uint8(pred))
        cf_gt.append(M.colorfulness_uint8(gt))
        psnr.append(M.psnr_uint8(pred, gt))
        if lpips_net is not None:
            lpips_values.append(M.lpips_distance(lpips_net, pred, gt))
        gray8 = M.to_uint8(gray)
        for i in range(min(len(pred), SAMPLE_ROWS - len(samples))):
            samples.append(tuple(t[i].permute(1, 2, 0).numpy() for t in (gray8, pred, gt)))
        n += len(pred)
        bar.update(len(pred))
    bar.close()
    if n == 0:
        raise ValueError(f"{uri}: the val split is empty (ingest with data.val_fraction > 0)")

    per_image = {"colorfulness": torch.cat(cf_pred).tolist(), "colorfulness_gt": torch.cat(cf_gt).tolist()}
    per_image["psnr"] = torch.cat(psnr).tolist()
    if lpips_values:
        per_image["lpips"] = torch.cat(lpips_values).double().tolist()
    results: dict[str, float] = {}
    if "fid" in wanted:
        if ref is None:
            ref = (gt_stats.mean(), gt_stats.cov(), gt_stats.n)
            if ref_path is not None:
                gt_stats.save(ref_path, manifest_sha256=manifest_sha, image_size=size, weights=eval_config.fid_weights)
        if ref[2] != n:
            warnings.warn(f"cached reference statistics cover {ref[2]} images, the predictions {n}", stacklevel=2)
        results["fid"] = M.frechet_distance(pred_stats.mean(), pred_stats.cov(), ref[0], ref[1])
    cf_p, cf_g = float(torch.cat(cf_pred).mean()), float(torch.cat(cf_gt).mean())
    if "colorfulness" in wanted:
        results["colorfulness"] = cf_p
        results["colorfulness_gt"] = cf_g
    if "delta_colorfulness" in wanted:
        results["delta_colorfulness"] = abs(cf_p - cf_g)
    if "psnr" in wanted:
        results["psnr"] = float(torch.cat(psnr).mean())
    if "lpips" in wanted:
        results["lpips"] = float(torch.cat(lpips_values).mean())

    protocol = {
        "split": "val (manifest order, each image once)",
        "dataset_manifest_sha256": manifest_sha,
        "data_size": data_config.size,
        "image_size": size,
        "resize": "none" if size == data_config.size else "bilinear antialiased on L and ab",
        "prediction": "lab_to_rgb(L_gt, clamp(ab_pred, -128, 127))",
        "ground_truth": "lab_to_rgb(L_gt, ab_gt)",
        "quantisation": "8-bit RGB (clamp [0,1], x255, round) before every metric",
        "fid": f"pytorch-fid InceptionV3 ({eval_config.fid_weights}), bilinear resize to 299, {fid_dims}-d "
        "pred vs gt of the same images, eigen-decomposition sqrtm",
        "colorfulness": "Hasler-Suesstrunk on 0..255 RGB, mean over images; delta = |CF(pred) - CF(gt)|",
        "psnr": "8-bit RGB, data range 255, per image then mean",
        "lpips": "lpips 0.1.4, net=alex, version 0.1, inputs scaled to [-1, 1], mean over images",
        "metric_weights": "cache" if pretrained == "cache" else "RANDOM INIT (meaningless FID/LPIPS)",
        "precision": f"network {precision}; metric networks fp32",
        "n_images": n,
    }
    protocol["eval_config_sha256"] = eval_config_sha256(eval_config, pretrained=pretrained, fid_dims=fid_dims)
    result = EvalResult(metrics=results, n_images=n, protocol=protocol, per_image=per_image)

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # atomic writes: `dvc metrics show` or a gate reading these never sees half a file
        storage.write_json(out / "metrics.json", {**results, "n_images": n})
        storage.write_bytes(out / PER_IMAGE_FILE, (json.dumps(_per_image_record(result)) + "\n").encode())
        storage.write_local_atomic(out / "samples.png", lambda tmp: Image.fromarray(_grid(samples)).save(tmp, "PNG"))
        storage.write_bytes(out / "report.md", _report(results, n, protocol).encode())
        result.out_dir = out
    if tracker is not None:
        logged = {**results, "n_images": float(n)}  # every metric record says how many images it covers
        tracker.log_metrics({METRIC_KEYS[k]: v for k, v in logged.items() if k in METRIC_KEYS}, step=step)
        identity = (manifest_sha, protocol["eval_config_sha256"], uri)
        tracker.set_tags(dict(zip(EVAL_TAGS, identity, strict=True)))
        if hasattr(tracker, "log_dataset"):  # the val split, as an "eval" input of the run
            tracker.log_dataset(uri, manifest_sha, "eval")
        if out_dir is not None:
            for name in ("metrics.json", "report.md", "samples.png", PER_IMAGE_FILE):
                tracker.log_artifact(Path(out_dir) / name, "eval")
    return result
